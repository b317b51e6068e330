"""The magnitude floor: every kept change flips its code (by mansu's check and by bitsandbytes), nothing else."""
import copy

import pytest
import torch

from mansu import quant
from mansu.errors import MansuError
from mansu.floor import apply_floor_, floor_targets, floor_update

bnbf = pytest.importorskip("bitsandbytes.functional")


def bnb_codes(w: torch.Tensor, qt: str) -> tuple[torch.Tensor, torch.Tensor]:
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=qt)
    p = packed.view(-1)
    return torch.stack([p >> 4, p & 15], 1).view(-1)[: w.numel()], state.absmax


def random_edit(shape, dtype, scale, density=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    upd = w.clone()
    mask = torch.rand(shape, generator=gen) < density
    upd[mask] += (torch.randn(int(mask.sum()), generator=gen) * scale).to(dtype)
    return w, upd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "nf4-dq"])
@pytest.mark.parametrize("mode", ["snap", "margin"])
@pytest.mark.parametrize("scale", [1e-5, 3e-2])  # far below a bin, and large enough to cross several
def test_floored_edits_flip_every_kept_weight_and_nothing_else(dtype, fmt, mode, scale):
    w, upd = random_edit((96, 160), dtype, scale)
    w0 = w.clone()
    out = floor_update(w, upd, fmt, mode=mode)
    assert torch.equal(w, w0) and out.dtype == dtype
    kept = out != w
    assert torch.equal(out[upd == w], w[upd == w])  # unchanged weights bit-identical
    assert kept.sum() > 0.9 * (upd != w).sum()  # only absmax elements and outward edge moves are dropped
    assert not (kept & (upd == w)).any()

    cert = quant.check({"w": w}, {"w": out}, [fmt], layout={"w": False})[fmt]
    assert cert.certified and cert.changed == int(kept.sum())

    qt = fmt.removesuffix("-dq")
    cb, ab = bnb_codes(w, qt)
    ca, aa = bnb_codes(out, qt)
    assert torch.equal(ab, aa)  # block scales (and so absmax elements) untouched
    assert torch.equal(cb != ca, kept.reshape(-1))  # bitsandbytes agrees: flipped iff kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("mode", ["snap", "margin"])
@pytest.mark.parametrize("shape", [(48, 96), (7, 45)])  # whole blocks; and a padded last block (315 = 4 x 64 + 59)
def test_floor_targets_are_floor_update_of_a_nudge_computed_on_the_mask_alone(dtype, fmt, mode, shape):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    mask = torch.rand(shape, generator=gen) < 0.3
    mask.view(-1)[-1] = True  # the padded block's weights too
    for sign, got in zip((1, -1), floor_targets(w, mask, fmt, mode=mode)):
        nudged = torch.where(mask, torch.nextafter(w, torch.full_like(w, sign * torch.inf)), w)
        expected = floor_update(w, nudged, fmt, mode=mode)[mask]
        assert got.dtype == dtype and torch.equal(got, expected)
        assert (got != w[mask]).float().mean() > 0.8  # most selected weights move (absmax and edge ones stay)


def test_moves_go_in_the_update_direction_and_snap_lands_on_levels():
    w, upd = random_edit((32, 64), torch.float32, 1e-4, density=0.3, seed=1)
    out = floor_update(w, upd, "nf4", mode="snap")
    kept = out != w
    assert torch.equal(torch.sign(out - w)[kept], torch.sign(upd - w)[kept])
    geom = quant.bin_geometry(w, "nf4")
    lv = torch.tensor(quant.NF4_LEVELS)
    level = lv[(geom.code + torch.sign(upd - w).long()).clamp(0, 15)]
    inner = kept & (level.abs() < 1)  # inner levels: the weight sits exactly on level * absmax
    assert torch.equal(out[inner], (level * geom.scale)[inner])
    assert torch.equal(quant.fake_quantize(out, "nf4")[inner], out[inner])


def test_margin_mode_keeps_updates_that_already_cross_well_inside():
    w = torch.tensor([[0.0, 1.0] + [0.5] * 62])
    upd = w.clone()
    upd[0, 2] = 0.5 + 0.3  # from level ~0.5626 bin to well inside a higher bin
    out = floor_update(w, upd, "nf4", mode="margin", margin=0.1)
    assert out[0, 2] == upd[0, 2]
    snapped = floor_update(w, upd, "nf4", mode="snap")
    assert snapped[0, 2] == torch.tensor(quant.NF4_LEVELS)[14]  # the level of the bin it landed in


def test_absmax_elements_and_outward_moves_at_the_edge_are_dropped():
    w = torch.tensor([[1.0, -0.95, 0.3] + [0.1] * 61])
    upd = w.clone()
    upd[0, 0] = 0.9  # the absmax element: changing it would rescale the block
    upd[0, 1] = -0.99  # already in the bottom bin and moving outward: nowhere to go
    upd[0, 2] = 0.30001  # fine: floored up one bin
    out = floor_update(w, upd, "nf4")
    assert out[0, 0] == 1.0 and out[0, 1] == -0.95 and out[0, 2] > 0.3
    assert quant.encode(out, "nf4").scale.item() == 1.0


def test_top_bin_targets_stay_below_the_absmax():
    w = torch.tensor([[1.0, 0.8] + [0.0] * 62], dtype=torch.bfloat16)
    upd = w.clone()
    upd[0, 1] = 0.81  # moves into the top bin, whose level is the absmax itself
    out = floor_update(w, upd, "nf4")
    assert 0.8615 < out[0, 1].item() < 1.0


def test_bad_arguments_raise():
    w = torch.zeros(64)
    with pytest.raises(MansuError, match="absmax-scaled"):
        floor_update(w, w, "q4_0")
    with pytest.raises(MansuError, match="mode"):
        floor_update(w, w, mode="push")
    with pytest.raises(MansuError, match="margin"):
        floor_update(w, w, margin=0.7)


def test_apply_floor_certifies_a_model_edit(tiny_model):
    model, _ = tiny_model
    original = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # a sparse edit everywhere, norms and embeddings included
            mask = torch.rand(p.shape, generator=gen) < 0.01
            p[mask] += torch.randn(int(mask.sum()), generator=gen) * 1e-4
    stats = apply_floor_(model, original)
    cert = quant.check(original, model, ("nf4",), layout=quant.quantized_weights(model))["nf4"]
    assert cert.certified and cert.flipped == stats.kept and stats.kept > 0.9 * stats.changed
    untouched = set(original) - set(quant.quantized_weights(model))
    assert any(not torch.equal(original[k], model.state_dict()[k]) for k in untouched)  # not the floor's business


def test_apply_floor_with_a_partial_original_floors_only_the_weights_given(tokenizer):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    original = copy.deepcopy(model.state_dict())
    layout = quant.quantized_weights(model)
    given, other = sorted(layout)[:2]
    with torch.no_grad():
        for name in (given, other):  # the same tiny edit on both
            model.get_parameter(name)[0, :8] += 1e-5
    edited_other = model.get_parameter(other).detach().clone()
    stats = apply_floor_(model, {given: original[given]})
    assert set(stats.per_tensor) == {given} and stats.kept == 8
    assert torch.equal(model.get_parameter(other), edited_other)  # not given: left as it was
    cert = quant.check({given: original[given]}, {given: model.get_parameter(given).detach()}, ("nf4",),
                       layout={given: layout[given]})["nf4"]
    assert cert.certified and cert.flipped == 8
    with pytest.raises(MansuError, match="not in the model"):
        apply_floor_(model, {"model.layers.0.mlp.up_proj.wieght": original[given]})
