import pytest
import torch

from mansu.data import encode
from mansu.errors import MansuError
from mansu.evaluation import answer_logprob
from mansu.fisher import BoundConfig, FisherConfig, bound_update, diagonal_fisher
from mansu.hooks import capture_inputs


def small_mask(model) -> dict[str, torch.Tensor]:
    """A few rows of the first 2-D weight after the embeddings, and the whole last 1-D parameter."""
    named = [(n, p) for n, p in model.named_parameters() if "lm_head" not in n]
    weight_name, weight = next((n, p) for n, p in named[2:] if p.dim() == 2)
    vector_name, vector = [(n, p) for n, p in named if p.dim() == 1][-1]
    rows = torch.zeros_like(weight, dtype=torch.bool)
    rows[3:7] = True
    return {weight_name: rows, vector_name: torch.ones_like(vector, dtype=torch.bool)}


def layer_mask(model) -> dict[str, torch.Tensor]:
    """Rows of one Linear/Conv1D weight, columns of another and a bias: what heads and neurons select, all
    read per item from a batched backward."""
    from mansu.projection import linear_like

    weights = [n for n, _ in model.named_parameters() if linear_like(model, n)[1] is not None and "lm_head" not in n]
    params = dict(model.named_parameters())
    rows, cols = (torch.zeros_like(params[n], dtype=torch.bool) for n in weights[:2])
    rows[2:5] = True
    cols[:, 1:4] = True
    mask = {weights[0]: rows, weights[1]: cols}
    bias = next((n for n in params if n.endswith(".bias") and n[: -len("bias")] + "weight" in weights), None)
    if bias is not None:  # Llama has none; GPT-2's Conv1D, GPT-NeoX's and Qwen2's q/k/v do
        mask[bias] = torch.zeros_like(params[bias], dtype=torch.bool)
        mask[bias][1::3] = True
    return mask


@pytest.mark.parametrize("which", ["layers", "with_a_norm"])
def test_matches_per_example_squared_gradients(which, tiny_model, capitals):
    model, tok = tiny_model
    items = capitals[:5]
    mask = layer_mask(model) if which == "layers" else small_mask(model)
    # 5 items in batches of 2: a short last batch; with a norm weight selected, one item per backward
    fisher = diagonal_fisher(model, tok, items, mask, FisherConfig(batch_size=2), progress=False)
    params = dict(model.named_parameters())
    grads = []
    for it in items:
        model.zero_grad()
        answer_logprob(model, encode(tok, [it.prompt], [it.answer])).sum().backward()
        grads.append({n: params[n].grad.clone() for n in mask})
    model.zero_grad(set_to_none=True)
    for name, m in mask.items():
        per_item = torch.stack([g[name] for g in grads])
        expected, mean = (per_item**2).mean(0) * m, per_item.mean(0)[m]
        # a batch's padding changes the float sums a little: within 1e-5 of the largest entry
        assert torch.allclose(fisher.dense(name), expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
        assert torch.allclose(fisher.grad[name], mean, rtol=1e-4, atol=1e-5 * float(mean.abs().max()))
        # The pitfall: the squared mean gradient is a much smaller, different quantity.
        assert (per_item.mean(0) ** 2)[m].sum() < 0.9 * fisher.values[name].sum()
        assert fisher.values[name].numel() == m.sum()


def test_unselected_parameters_get_no_gradient(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    mask = small_mask(model)
    params, first = dict(model.named_parameters()), next(iter(mask))
    frozen = "model.layers.1.mlp.up_proj.weight"
    params[frozen].requires_grad_(False)
    own = params[first].grad = torch.ones_like(params[first])  # a caller's gradient survives the call
    fired = []
    handles = [p.register_hook(lambda g, n=n: fired.append(n))
               for n, p in model.named_parameters() if n not in mask and p.requires_grad]
    try:
        fisher = diagonal_fisher(model, tokenizer, capitals[:3], mask, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert fired == []  # no gradient was computed for a parameter outside the mask
    assert set(fisher.values) == set(mask)
    assert params[first].grad is own
    assert all(p.grad is None for n, p in params.items() if n != first)
    assert all(p.requires_grad == (n != frozen) for n, p in model.named_parameters())


def test_true_fisher_matches_the_analytic_output_layer_fisher(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked prediction, so sampled labels differ from the real one
    item = capitals[0]  # " Paris": one answer token, so one output position contributes
    batch = encode(tokenizer, [item.prompt], [item.answer])
    assert batch.target_mask.sum() == 1
    with torch.no_grad(), capture_inputs({"head": model.lm_head}) as seen:
        probs = torch.softmax(model(input_ids=batch.input_ids).logits[0, -2], -1).double()
    h2 = (seen["head"][0][0, -2].double() ** 2).sum()
    answer = int(batch.input_ids[0, -1])
    rows = torch.cat([probs.topk(8).indices, torch.tensor([answer])]).unique()
    # For logits W h and label y: d log p_y / d W_v = (1[y = v] - p_v) h, so row v's squared gradient sums
    # to (1[y = v] - p_v)^2 |h|^2, whose mean over y ~ p is p_v (1 - p_v) |h|^2.
    p = probs[rows]
    empirical_total = (((rows == answer).double() - p) ** 2).sum() * h2
    true_total = (p * (1 - p)).sum() * h2
    assert abs(empirical_total - true_total) > 0.2 * true_total  # the test can tell the two apart
    mask = {"lm_head.weight": torch.zeros_like(model.lm_head.weight, dtype=torch.bool)}
    mask["lm_head.weight"][rows] = True
    empirical = diagonal_fisher(model, tokenizer, [item], mask, progress=False)
    config = FisherConfig("true", samples=100)
    true = diagonal_fisher(model, tokenizer, [item], mask, config, progress=False)
    assert empirical.values["lm_head.weight"].double().sum() == pytest.approx(empirical_total.item(), rel=1e-3)
    assert true.values["lm_head.weight"].double().sum() == pytest.approx(true_total.item(), rel=0.2)
    again = diagonal_fisher(model, tokenizer, [item], mask, config, progress=False)
    assert torch.equal(true.values["lm_head.weight"], again.values["lm_head.weight"])  # seeded


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bound_predicts_the_retain_divergence_and_gradient_the_first_order(arch, tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny(arch, tokenizer).double()  # float64: changes of 1e-7 must not be rounding noise
    items = capitals[:6]
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if ".1." in n and p.dim() == 2}
    fisher = diagonal_fisher(model, tokenizer, items, mask, FisherConfig("true", samples=8), progress=False)
    params, g = dict(model.named_parameters()), torch.Generator().manual_seed(0)
    batch = encode(tokenizer, [it.prompt for it in items], [it.answer for it in items])

    def shifted(delta):
        """Log-probs over the vocabulary [B, T-1, V] and the mean answer NLL, with `delta` added."""
        with torch.no_grad():
            for n, d in delta.items():
                params[n].add_(d)
            logp = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                                     .logits[:, :-1], -1)
            for n, d in delta.items():
                params[n].sub_(d)
        nll = -(logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0] * batch.target_mask).sum(-1).mean()
        return logp, nll.item()

    ref, base = shifted({})
    ratios = []
    for _ in range(3):
        delta = {n: 1e-2 * torch.randn(m.shape, generator=g, dtype=torch.float64) for n, m in mask.items()}
        logp = shifted(delta)[0]
        # The true Fisher is the Hessian of the retain KL at the current weights, minimum or not; its
        # diagonal misses the off-diagonal curvature, which averages out over random directions only.
        kl = ((ref.exp() * (ref - logp)).sum(-1) * batch.target_mask).sum(-1).mean().item()
        ratios.append(kl / fisher.cost(delta))
        # The antisymmetric part of the NLL change is the first-order term, exact up to third order.
        small = {n: d / 100 for n, d in delta.items()}  # so the third-order term is negligible
        first = fisher.predicted_change(small) - fisher.cost(small)
        assert (shifted(small)[1] - shifted({n: -d for n, d in small.items()})[1]) / 2 == pytest.approx(first, rel=0.01)
    # Measured over 4 tiny architectures and update scales 1e-3..1e-2: 0.58..1.53 per direction.
    assert 0.5 < sum(ratios) / len(ratios) < 2


def test_bound_update_keeps_the_cheapest_entries_within_budget(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("gpt2", tokenizer)
    mask = small_mask(model)
    fisher = diagonal_fisher(model, tokenizer, capitals[:4], mask, progress=False)
    g = torch.Generator().manual_seed(0)
    update = {n: torch.randn(m.shape, generator=g) * m for n, m in mask.items()}
    full = fisher.cost(update)
    pruned = bound_update(fisher, update, BoundConfig(budget=full / 3))
    assert pruned.cost <= full / 3 and fisher.cost(pruned.update) == pytest.approx(pruned.cost, rel=1e-5)
    assert 0 < pruned.kept < pruned.total
    costs = fisher.entry_costs(update)
    kept = torch.cat([pruned.update[n][mask[n]] != 0 for n in costs])
    flat = torch.cat(list(costs.values()))
    assert flat[kept].max() <= flat[~kept].min()  # every kept entry is cheaper than every pruned one
    for n in update:  # kept entries are moved exactly as asked
        assert torch.equal(pruned.update[n][pruned.update[n] != 0], update[n][pruned.update[n] != 0])
    scaled = bound_update(fisher, update, BoundConfig(budget=full / 3, mode="scale"))
    assert scaled.cost == pytest.approx(full / 3) and fisher.cost(scaled.update) == pytest.approx(full / 3, rel=1e-5)
    untouched = bound_update(fisher, update, BoundConfig(budget=2 * full))
    assert untouched.kept == untouched.total and untouched.scale == 1.0


def test_bad_inputs_raise(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    mask = small_mask(model)
    with pytest.raises(MansuError, match="empty retain"):
        diagonal_fisher(model, tokenizer, [], mask, progress=False)
    with pytest.raises(MansuError, match="selects no"):
        diagonal_fisher(model, tokenizer, capitals[:2], {n: m & False for n, m in mask.items()}, progress=False)
    with pytest.raises(MansuError, match="does not have"):
        diagonal_fisher(model, tokenizer, capitals[:2], {"nope.weight": torch.ones(2, dtype=torch.bool)})
    fisher = diagonal_fisher(model, tokenizer, capitals[:2], mask, progress=False)
    with pytest.raises(MansuError, match="outside"):
        fisher.cost({n: torch.ones(m.shape) for n, m in mask.items()})
    with pytest.raises(MansuError, match="no Fisher"):
        fisher.cost({"model.layers.0.input_layernorm.weight": torch.ones(64)})
    for bad in (dict(kind="exact"), dict(samples=0)):
        with pytest.raises(MansuError):
            FisherConfig(**bad)
    for bad in (dict(budget=0.0), dict(budget=float("nan")), dict(budget=1.0, mode="clip")):
        with pytest.raises(MansuError):
            BoundConfig(**bad)
