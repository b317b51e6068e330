"""Heads and neurons on the module tree: counts, and masks that own exactly their component."""
import pytest
import torch
from torch import nn

from mansu import MansuError
from mansu.attribution import ablated
from mansu.components import Component, find_components
from mansu.hooks import capture_inputs

from conftest import TINY


def _ids(tokenizer):
    return torch.tensor([tokenizer("The capital of France is Paris")["input_ids"]])


def _perturb(model, mask, scale=0.5):
    """Add noise to the masked entries only (seeded)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in mask:
                p[mask[name]] += scale * torch.randn(int(mask[name].sum()), generator=g)


def test_counts(tiny_model):
    model, _ = tiny_model
    comps = find_components(model)
    gqa = model.config.model_type in ("llama", "qwen2")
    assert (comps.heads, comps.kv_heads, comps.head_dim, comps.neurons) == (
        TINY["heads"], TINY["kv_heads"] if gqa else TINY["heads"], TINY["hidden"] // TINY["heads"], TINY["ffn"])
    assert len(comps.sites("head")) == len(comps.sites("neuron")) == TINY["layers"]
    assert len(comps.all()) == TINY["layers"] * (TINY["heads"] + TINY["ffn"])


def test_embedded_counts(embedded):
    comps = find_components(embedded[0])
    assert (len(comps.layers), comps.heads, comps.kv_heads, comps.head_dim, comps.neurons) == (30, 9, 3, 64, 1536)


@pytest.mark.parametrize("kv", [False, True])
def test_qkv_rows_reach_only_their_heads(tiny_model, kv):
    """Perturbing a head's q (and k/v) rows changes only that head's (and its KV group's) activation:
    this pins the fused layouts (GPT-2 blocks, GPT-NeoX per-head interleaving) and the GQA group."""
    model, tok = tiny_model
    comps = find_components(model)
    head, site = 2, comps.sites("head")[0]
    mask = comps.mask(model, [Component("head", 0, head)], kv=kv)
    mask = {n: m for n, m in mask.items() if comps.layout.o not in n}  # keep q/k/v only
    with torch.no_grad(), capture_inputs({"o": model.get_submodule(site)}) as before:
        model(_ids(tok))
    _perturb(model, mask)
    with torch.no_grad(), capture_inputs({"o": model.get_submodule(site)}) as after:
        model(_ids(tok))
    changed = (after["o"][0] - before["o"][0]).abs().amax(dim=(0, 1)).view(comps.heads, -1).amax(-1) > 1e-6
    group = comps.heads // comps.kv_heads
    expected = torch.zeros(comps.heads, dtype=torch.bool)
    if kv:
        expected[head // group * group: (head // group + 1) * group] = True
    expected[head] = True
    assert changed.tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["head", "neuron"])
def test_ablated_component_ignores_its_parameters(tiny_model, kind):
    """With a component (and its KV group) ablated, noise on its mask cannot change the logits; noise
    on a neighbouring component's mask does, so the test can fail."""
    model, tok = tiny_model
    comps = find_components(model)
    group = comps.heads // comps.kv_heads if kind == "head" else 1
    owned = [Component(kind, 0, i) for i in range(group)]
    other = comps.mask(model, [Component(kind, 0, group)])
    with torch.no_grad(), ablated(model, owned):
        clean = model(_ids(tok)).logits
        _perturb(model, comps.mask(model, owned))
        assert torch.allclose(model(_ids(tok)).logits, clean, atol=1e-5)
        _perturb(model, other)
        assert not torch.allclose(model(_ids(tok)).logits, clean, atol=1e-3)


def test_mask_sizes(tiny_model):
    model, _ = tiny_model
    comps = find_components(model)
    h, d = TINY["hidden"], comps.head_dim
    head = comps.mask(model, [Component("head", 1, 0)])
    neuron = comps.mask(model, [Component("neuron", 1, 7)])
    count = lambda m, suffix: sum(int(v.sum()) for n, v in m.items() if n.endswith(suffix))
    assert count(head, "weight") == 4 * h * d  # q, k, v rows and o columns
    assert count(neuron, "weight") == len(comps.layout.mlp_in) * h + h
    assert count(head, "bias") in (0, 3 * d) and count(neuron, "bias") in (0, 1)  # never the shared output bias
    for name, m in {**head, **neuron}.items():
        assert m.shape == model.get_parameter(name).shape and m.dtype == torch.bool


def test_component_names_round_trip():
    for c in (Component("head", 3, 2), Component("neuron", 29, 1535)):
        assert Component.parse(str(c)) == c
    with pytest.raises(MansuError, match="not a component name"):
        Component.parse("layer3.head2")


def test_unknown_architecture_names_what_is_missing():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.o_proj = nn.Linear(4, 4)
            self.ffn = nn.Linear(4, 4)

    odd = nn.Module()
    odd.model = nn.Module()
    odd.model.layers = nn.ModuleList([Block()])
    with pytest.raises(MansuError, match="lacks .*self_attn.q_proj.*mlp.down_proj"):
        find_components(odd)
    with pytest.raises(MansuError, match="no decoder-layer list"):
        find_components(nn.Linear(2, 2))
