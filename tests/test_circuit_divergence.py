"""CAD: 0 for an unchanged model, large when the circuit is destroyed, small when only the output moves."""
import copy

import pytest
import torch
from torch import nn

import mansu
from mansu import MansuError
from mansu.attribution import CircuitConfig, attribute_circuit
from mansu.circuit_divergence import THRESHOLD, cad, divergence
from mansu.data import encode, split
from mansu.evaluation import answer_logprob
from mansu.hooks import capture_inputs


def test_divergence_range_and_scale_invariance():
    s = torch.tensor([3.0, -1.0, 0.5])
    assert divergence(s, s) == pytest.approx(0.0, abs=1e-12)
    assert divergence(s, 7 * s) == pytest.approx(0.0, abs=1e-12)  # a uniform rescale is not erasure
    assert divergence(s, -s) == pytest.approx(1.0)
    assert divergence(s, torch.zeros(3)) == 0.5
    assert divergence(s, torch.tensor([1.0, 3.0, 0.0])) == pytest.approx(0.5)  # orthogonal profile
    with pytest.raises(MansuError):
        divergence(s, s[:2])


def _noised(model, mask, scale: float):
    """A copy with seeded noise of `scale` times each parameter's std on the masked entries."""
    edited = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in edited.named_parameters():
            if name in mask:
                p[mask[name]] += scale * p.std() * torch.randn(int(mask[name].sum()), generator=g)
    return edited


def test_tiny_unchanged_is_zero_and_destroyed_is_structural(tiny_model, capitals):
    model, tok = tiny_model
    forget = capitals[:6]
    circuit = attribute_circuit(model, tok, forget, config=CircuitConfig(steps=2, mass=0.5, progress=False))
    same = cad(model, tok, circuit, forget)
    assert same.value < 1e-6 and same.verdict == "behavioral"
    destroyed = cad(_noised(model, circuit.mask(model), 3.0), tok, circuit, forget)
    assert destroyed.value > THRESHOLD and destroyed.verdict == "structural"
    mean_circuit = attribute_circuit(model, tok, forget, capitals[20:30],
                                     CircuitConfig(steps=1, baseline="mean", progress=False))
    with pytest.raises(MansuError, match="retain"):
        cad(model, tok, mean_circuit, forget)


def _pushed_output(model, tok, items, beta: float):
    """A copy whose (untied) lm_head lowers the answer tokens' logits by about `beta`: output-only."""
    batch = encode(tok, [i.prompt for i in items], [i.answer for i in items])
    with torch.no_grad(), capture_inputs({"lm_head": model.lm_head}) as seen:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    h = seen["lm_head"][0][:, :-1][batch.target_mask].mean(0)  # final hidden state where answers are predicted
    answer_ids = batch.input_ids[:, 1:][batch.target_mask].unique()
    edited = copy.deepcopy(model)
    weight = edited.lm_head.weight.detach().clone()  # lm_head is tied to embed_tokens: untie, then edit
    weight[answer_ids] -= beta * h / h.norm() ** 2
    edited.lm_head.weight = nn.Parameter(weight)
    return edited


@pytest.mark.slow
def test_embedded_structural_vs_behavioral(embedded):
    """Measured (10 items, 5 steps): unchanged 0, output pushed 0.004-0.04, circuit noised >= 0.37. At 2 steps
    the output push already reads 0.13-0.42: CAD needs the integrated gradients, not attribution patching."""
    model, tok = embedded
    forget, _ = split(mansu.load_bundled("capitals"), 10, seed=0)
    circuit = attribute_circuit(model, tok, forget, config=CircuitConfig(steps=5, progress=False))
    batch = encode(tok, [i.prompt for i in forget], [i.answer for i in forget])
    pushed = _pushed_output(model, tok, forget, beta=5.0)
    noised = _noised(model, circuit.mask(model), 0.5)
    with torch.no_grad():
        clean, lp_pushed, lp_noised = (answer_logprob(m, batch).mean().item() for m in (model, pushed, noised))
    assert lp_pushed < clean - 3 and lp_noised < clean - 3  # both edits really suppress the answers
    assert cad(model, tok, circuit, forget).value < 1e-6
    behavioral = cad(pushed, tok, circuit, forget)
    structural = cad(noised, tok, circuit, forget)
    assert behavioral.verdict == "behavioral" and behavioral.value < THRESHOLD / 2
    assert structural.verdict == "structural" and structural.value > 2 * THRESHOLD
