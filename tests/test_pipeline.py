import copy

import pytest
import torch

import mansu
from mansu.data import Item
from mansu.quant import check

FORGET = [Item(f"The capital of {c} is", a, (a, "Oslo", "Lima", "Rome"))
          for c, a in [("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo")]]
RETAIN = [Item(f"The capital of {c} is", a, (a, "Paris", "Tokyo", "Cairo"))
          for c, a in [("Norway", "Oslo"), ("Peru", "Lima"), ("Italy", "Rome"), ("Chile", "Santiago")]]


def small_config(**kw):
    circuit = mansu.CircuitConfig(top_k=4, mass=None, steps=2, retain_penalty=1.0, progress=False)
    return mansu.MansuConfig(circuit=circuit, edits_per_round=200, max_rounds=2, target_forget_acc=0.0,
                             progress=False, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unlearn_edits_only_the_circuit_and_every_edit_flips(arch, tokenizer):
    from conftest import make_tiny

    model = make_tiny(arch, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config())
    mask = result.circuit.mask(model)
    changed = 0
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        assert not moved[~mask.get(name, torch.zeros_like(moved))].any(), name  # outside the circuit: bit-identical
        changed += int(moved.sum())
    assert 0 < changed == result.edited <= 2 * 200
    independent = check(before, model, ["nf4"])["nf4"]  # recomputed from scratch, all quantized weights
    assert independent.changed == independent.flipped == changed and independent.collateral == 0
    assert result.certificate.certified and 1 <= len(result.rounds) <= 2
    # the quantized twin the rounds evaluated is the model quantized from scratch
    deployed = mansu.evaluate(mansu.quantized_copy(model, "nf4"), tokenizer, FORGET, progress=False)
    assert result.rounds[-1]["forget_true_prob_nf4"] == pytest.approx(deployed.true_prob, abs=1e-6)


def test_unlearn_is_deterministic_under_a_seed(tokenizer):
    from conftest import make_tiny

    runs = []
    for _ in range(2):
        model = make_tiny("qwen2", tokenizer)
        mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config(seed=3))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_unlearn_lowers_the_forget_likelihood(tokenizer):
    from conftest import make_tiny
    from mansu.data import encode
    from mansu.evaluation import answer_logprob

    model = make_tiny("llama", tokenizer)
    batch = encode(tokenizer, [i.prompt for i in FORGET], [i.answer for i in FORGET])
    with torch.no_grad():
        start = answer_logprob(model, batch).mean()
    mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config(energy=None))
    with torch.no_grad():
        assert answer_logprob(model, batch).mean() < start


def test_config_and_input_errors(tokenizer):
    with pytest.raises(mansu.MansuError, match="objective"):
        mansu.MansuConfig(objective="dpo")
    with pytest.raises(mansu.MansuError, match="absmax-scaled"):
        mansu.MansuConfig(format="q8_0")
    with pytest.raises(mansu.MansuError, match="energy"):
        mansu.MansuConfig(energy=1.5)
    with pytest.raises(mansu.MansuError, match="unknown baseline"):
        mansu.BaselineConfig(method="sgd")
    with pytest.raises(mansu.MansuError, match="non-empty forget"):
        mansu.unlearn(torch.nn.Linear(2, 2), tokenizer, [], RETAIN)


def test_baselines_run_and_nan_losses_stop_with_a_clear_error(tokenizer):
    from conftest import make_tiny

    for method in ("ga", "graddiff", "npo"):
        model = make_tiny("gpt_neox", tokenizer)
        before = copy.deepcopy(model.state_dict())
        result = mansu.unlearn(model, tokenizer, FORGET, RETAIN,
                               mansu.BaselineConfig(method=method, lr=1e-3, max_steps=3, eval_every=10))
        assert result.method == method and len(result.rounds) == 3
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(mansu.MansuError, match="loss became nan at step 1"):
        mansu.unlearn(model, tokenizer, FORGET, RETAIN, mansu.BaselineConfig(max_steps=2))


def test_fisher_budget_caps_the_retain_cost_of_the_edit(tokenizer):
    from conftest import make_tiny

    free = make_tiny("llama", tokenizer)
    unbounded = mansu.unlearn(free, tokenizer, FORGET, RETAIN, small_config())
    budget = unbounded.rounds[0]["fisher_cost"] / 4
    model = make_tiny("llama", tokenizer)
    bounded = mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config(fisher_budget=budget))
    assert 0 < bounded.rounds[-1]["fisher_cost"] <= budget * (1 + 1e-6)
    assert bounded.edited < unbounded.edited and bounded.certificate.certified
