import pytest
import torch
from torch.func import functional_call

from mansu.data import batches
from mansu.errors import MansuError
from mansu.hooks import capture_inputs
from mansu.projection import ProjectionConfig, linear_like, null_space_projector, retain_basis


def circuit_mask(model) -> dict[str, torch.Tensor]:
    """Like heads and neurons: a block of output rows on even linear weights, half the input columns on odd."""
    mask = {}
    for i, (name, p) in enumerate(n for n in model.named_parameters() if "lm_head" not in n[0]):
        _, module, conv1d = linear_like(model, name)
        if module is None:
            continue
        out_dim, in_dim = p.shape[::-1] if conv1d else p.shape
        m = torch.zeros(out_dim, in_dim, dtype=torch.bool)
        if i % 2:
            m[:, : in_dim // 2] = True
        else:
            m[out_dim // 4 : out_dim // 2] = True
        mask[name] = m.T if conv1d else m
    return mask


def random_update(model, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.randn(m.shape, generator=g) * 1e-2 * m for n, m in mask.items() if n in params}


def layer_output_changes(model, tok, items, update):
    """||module(x; W + delta) - module(x; W)|| over the retain tokens' inputs, per updated weight."""
    modules = {n: linear_like(model, n)[1] for n in update}
    with torch.no_grad(), capture_inputs(modules) as seen:
        batch = next(batches(tok, items, len(items)))
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    out = {}
    for name, module in modules.items():
        x = seen[name][0][batch.attention_mask.bool()]
        w = module.weight
        out[name] = (functional_call(module, {"weight": w + update[name]}, (x,)) - module(x)).norm().item()
    return out


def test_projected_update_leaves_retain_outputs_unchanged(tiny_model, capitals):
    model, tok = tiny_model
    retain = capitals[:4]  # 24 tokens: fewer than every layer's selected input dimension
    mask = circuit_mask(model)
    update = random_update(model, mask)
    projector = null_space_projector(model, tok, retain, mask, ProjectionConfig(energy=1.0), progress=False)
    projected = projector.apply(update)
    raw = layer_output_changes(model, tok, retain, update)
    after = layer_output_changes(model, tok, retain, projected)
    for name in update:
        assert after[name] < 1e-4 * raw[name], name
        assert not projected[name][~mask[name]].any()  # the circuit's rows/columns are kept
        # The update survives outside the retain subspace (24 directions out of >= 32).
        assert projected[name].norm() > 0.3 * update[name].norm(), name
    # End to end, every layer projected: retain answers barely move, the raw update moves them.
    batch = next(batches(tok, retain, len(retain)))

    def shift(delta):
        params = {n: p + delta.get(n, 0) for n, p in model.named_parameters()}
        with torch.no_grad():
            return (functional_call(model, params, (), {"input_ids": batch.input_ids}).logits
                    - model(input_ids=batch.input_ids).logits).abs().max().item()

    assert shift(projected) < 1e-3 * shift(update)


def test_energy_below_one_removes_most_of_the_retain_response(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    retain = capitals[:20]  # 120 tokens: more than the dimension, so the threshold decides
    mask = circuit_mask(model)
    update = random_update(model, mask)
    raw = layer_output_changes(model, tokenizer, retain, update)
    kept = {}
    for energy in (0.9, 0.99, 0.999):
        projector = null_space_projector(model, tokenizer, retain, mask, ProjectionConfig(energy), progress=False)
        after = layer_output_changes(model, tokenizer, retain, projector.apply(update))
        kept[energy] = sum(after.values()) / sum(raw.values())
    assert kept[0.999] < kept[0.99] < kept[0.9] < 0.5


def test_threshold_is_relative_to_the_energy_not_absolute():
    x = torch.randn(50, 8) @ torch.diag(torch.tensor([10.0, 5, 2, 1, 0.1, 0.01, 0.001, 0.0001]))
    cov = x.T @ x
    small, large = retain_basis(cov * 1e-6, 0.99), retain_basis(cov * 1e6, 0.99)
    assert small.shape == large.shape and 0 < small.shape[1] < 8
    assert retain_basis(cov, 1.0).shape[1] == 8
    assert retain_basis(torch.zeros(4, 4), 0.99).shape[1] == 0  # nothing to protect


def test_shared_inputs_share_one_basis(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    q, k, o = (f"model.layers.0.self_attn.{m}_proj.weight" for m in "qko")
    mask = {q: torch.zeros(64, 64, dtype=torch.bool), k: torch.zeros(32, 64, dtype=torch.bool),
            o: torch.zeros(64, 64, dtype=torch.bool)}
    mask[q][:16] = mask[k][:16] = mask[o][:, :16] = True  # one head's q/k rows, its o columns
    projector = null_space_projector(model, tokenizer, capitals[:4], mask, progress=False)
    layers = projector.layers
    assert layers[q].basis is layers[k].basis  # q and k read the same tensor: one covariance, one eigh
    assert layers[o].basis.shape[0] == 16  # o's eigenproblem is the head's size, not the layer's
    assert projector.tokens == 24


def test_biases_are_reported_and_passed_through(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("gpt2", tokenizer)
    bias = "transformer.h.0.attn.c_attn.bias"
    mask = {**circuit_mask(model), bias: torch.ones(192, dtype=torch.bool)}
    projector = null_space_projector(model, tokenizer, capitals[:4], mask, progress=False)
    assert projector.skipped == [bias]
    delta = torch.ones(192)
    assert projector.apply({bias: delta})[bias] is delta


def test_bad_inputs_raise(tokenizer, capitals):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    mask = circuit_mask(model)
    with pytest.raises(MansuError, match="empty retain"):
        null_space_projector(model, tokenizer, [], mask, progress=False)
    scattered = {"model.layers.0.self_attn.q_proj.weight": torch.eye(64, dtype=torch.bool)}
    with pytest.raises(MansuError, match="rows x columns"):
        null_space_projector(model, tokenizer, capitals[:2], scattered, progress=False)
    for bad in (dict(energy=0.0), dict(energy=1.5), dict(batch_size=0)):
        with pytest.raises(MansuError):
            ProjectionConfig(**bad)


def test_a_whole_model_update_passes_through_outside_the_circuit(tiny_model, capitals):
    model, tok = tiny_model
    mask = circuit_mask(model)
    projector = null_space_projector(model, tok, capitals[:4], mask, progress=False)
    g = torch.Generator().manual_seed(1)
    update = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}  # e.g. a full gradient
    projected = projector.apply(update)
    assert projected.keys() == update.keys()
    for name, delta in update.items():
        layer = projector.layers.get(name)
        if layer is None:  # no projector for this parameter: untouched
            assert torch.equal(projected[name], delta), name
            continue
        d, out = (delta.T, projected[name].T) if layer.conv1d else (delta, projected[name])
        outside = torch.ones(d.shape[1], dtype=torch.bool)
        outside[layer.columns] = False
        assert torch.equal(out[:, outside], d[:, outside]), name  # columns it knows nothing of: as given
        inside = torch.zeros_like(d)
        inside[:, layer.columns] = d[:, layer.columns]
        expected = layer.apply(inside.T if layer.conv1d else inside)
        expected = expected.T if layer.conv1d else expected
        assert torch.allclose(out[:, layer.columns], expected[:, layer.columns]), name
        assert not torch.allclose(out[:, layer.columns], d[:, layer.columns]), name  # and it was projected
