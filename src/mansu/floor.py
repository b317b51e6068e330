"""The magnitude floor: every weight an edit changes ends in a different quantization bin, nothing else moves.

A changed weight is moved at least to the neighbouring bin in its update's direction (NF4 by default). The
block's absmax element is never changed and no weight is moved onto or past it, so every block keeps its
scale and every unchanged weight keeps its code: zero collateral flips, by construction. See docs/quant.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import MansuError
from .quant import Format, block_absmax, codes_at_scale, get_format, quantized_layout, quantized_weights, to_blocks
from .results import Result

_NUDGES = 16  # casting to bf16 moves a value by at most half an ulp; a few ulps back inward always suffice


def _target_values(fmt: Format, a: Tensor, scale: Tensor, target: Tensor, margin: float, mode: str
                   ) -> tuple[Tensor, Tensor]:
    """Where each moved weight goes inside its target bin, and the bin's middle; weight units, fp32."""
    lv, edges = fmt.levels_tensor(target.device), fmt.edges(target.device)  # outermost bins end at the absmax
    lo, hi = edges[target], edges[target + 1]
    middle = (lo + hi) / 2
    if mode == "snap":
        # The outermost levels are +-absmax itself, and FP4's two zero bins share level 0 on their edge:
        # there the bin's middle is the safe point.
        centre = lv[target]
        goal = torch.where((centre <= lo) | (centre >= hi), middle, centre)
    else:
        width = hi - lo
        goal = torch.clamp(a / scale, lo + margin * width, hi - margin * width)
    return goal * scale, middle * scale


def _plan_moves(fmt: Format, b: Tensor, a: Tensor, absmax: Tensor, tail: bool, margin: float, mode: str
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For touched fp32 blocks `b` -> `a` under their fixed `absmax` [blocks, 1]: which weights move, their
    target bin, where they go in it and the bin's middle (weight units)."""
    code = codes_at_scale(fmt, b, absmax[:, 0], tail)
    up = a > b
    landed = codes_at_scale(fmt, a, absmax[:, 0], tail)  # block scales stay fixed, so this is final
    target = torch.where(up, torch.maximum(landed, code + 1), torch.minimum(landed, code - 1))
    # Absmax elements keep the block's scale; an outward move from the outermost level has nowhere to go.
    move = (a != b) & (b.abs() < absmax) & (target >= 0) & (target < len(fmt.levels))
    target = target.clamp(0, len(fmt.levels) - 1)
    goal, middle = _target_values(fmt, a, absmax, target, margin, mode)
    return move, target, goal, middle


def floor_update(
    original: Tensor,
    updated: Tensor,
    fmt: str | Format = "nf4",
    blocksize: int | None = None,
    margin: float = 0.1,
    mode: str = "snap",
) -> Tensor:
    """`updated` with every changed weight moved into a different `fmt` bin than `original`'s, in the
    update's direction; both in the quantizer's layout. mode 'snap': onto the target bin's level;
    'margin': the update itself, but at least `margin` bin widths inside the target bin.
    Dropped (left at the original value): the block's absmax elements, outward moves from the outermost level.
    """
    fmt = get_format(fmt, blocksize)
    if not fmt.absmax_scaled:
        raise MansuError(f"the floor needs an absmax-scaled format (nf4, fp4 and -dq), not {fmt.name}")
    if mode not in ("snap", "margin"):
        raise MansuError(f"unknown floor mode {mode!r}; choose 'snap' or 'margin'")
    if not 0 <= margin < 0.5:
        raise MansuError(f"margin must be in [0, 0.5), got {margin}")
    if original.shape != updated.shape or original.dtype != updated.dtype:
        raise MansuError("original and updated must have the same shape and dtype")
    full, tail = to_blocks(original, fmt)
    full = full.clone()  # to_blocks returns a view of a float32 input; the caller's tensor stays as it was
    after, _ = to_blocks(updated, fmt)
    touched = (full != after).any(1)
    idx = touched.nonzero()[:, 0]
    if idx.numel() == 0:
        return original.clone()
    tail = tail and bool(touched[-1])
    b, a = full[idx], after[idx]
    absmax = b.abs().amax(1, keepdim=True)
    full[idx] = _settle(fmt, b, a, absmax, tail, margin, mode, original.dtype)
    return full.reshape(-1)[: original.numel()].reshape(original.shape).to(original.dtype)


def _settle(fmt: Format, b: Tensor, a: Tensor, absmax: Tensor, tail: bool, margin: float, mode: str,
            dtype: torch.dtype) -> Tensor:
    """Blocks `b` -> `a` (fp32) floored, as fp32 holding values exact in `dtype`: each moved weight in its target
    bin, every other weight as in `b`."""
    move, target, goal, middle = _plan_moves(fmt, b, a, absmax, tail, margin, mode)
    new, inward = goal.to(dtype), middle.to(dtype)
    for _ in range(_NUDGES):  # the model's dtype may round a value over an edge or onto the absmax
        bad = move & ((codes_at_scale(fmt, new.float(), absmax[:, 0], tail) != target) | (new.float().abs() >= absmax))
        if not bad.any():
            break
        new = torch.where(bad, torch.nextafter(new, inward), new)
    move &= ~bad  # never expected: a value that still misses its bin is dropped rather than mis-certified
    return torch.where(move, new.float(), b)


def floor_targets(w: Tensor, mask: Tensor, fmt: str | Format = "nf4", margin: float = 0.1, mode: str = "snap"
                  ) -> tuple[Tensor, Tensor]:
    """Where each weight `mask` selects lands when floored one bin up, and one bin down: two flat vectors in
    `w`'s dtype, in mask order; both in the quantizer's layout. A weight that cannot move (a block's absmax,
    the outermost level) keeps its value. The same values as `floor_update` gives a nudge of the selected
    weights, computed on the selected weights alone, so the cost follows the mask, not the tensor."""
    fmt = get_format(fmt)
    absmax = block_absmax(w, fmt)
    index = mask.reshape(-1).nonzero()[:, 0]
    row, values = index // fmt.blocksize, w.reshape(-1)[index].float()
    # A padded last block is scaled by division, not by the reciprocal (as bitsandbytes does): it goes on its own.
    last = row == len(absmax) - 1 if w.numel() % fmt.blocksize else torch.zeros_like(row, dtype=torch.bool)
    parts = [(p, tail) for p, tail in ((~last, False), (last, True)) if p.any()]
    out = []
    for sign in (1, -1):
        moved = torch.empty_like(values)
        for part, tail in parts:
            b = values[part][None] if tail else values[part][:, None]
            peak = absmax[row[part][:1] if tail else row[part]][:, None]
            a = torch.nextafter(b, torch.full_like(b, sign * math.inf))
            moved[part] = _settle(fmt, b, a, peak, tail, margin, mode, w.dtype).reshape(-1)
        out.append(moved.to(w.dtype))
    return out[0], out[1]


@dataclass(repr=False)
class FloorStats(Result):
    """What the floor did: weights changed by the edit, kept (each now flips its code), dropped (reverted)."""

    format: str
    mode: str
    changed: int
    kept: int
    dropped: int
    per_tensor: dict[str, dict[str, int]] = field(default_factory=dict)


@torch.no_grad()
def apply_floor_(
    model: nn.Module,
    original: Mapping[str, Tensor],
    fmt: str | Format = "nf4",
    blocksize: int | None = None,
    margin: float = 0.1,
    mode: str = "snap",
) -> FloorStats:
    """Floor, in place, every quantized weight of `model` that differs from its value in `original`: a state
    dict, complete or partial (a weight it does not hold is left as it is, floored or not)."""
    fmt = get_format(fmt, blocksize)
    unknown = sorted(set(original) - set(model.state_dict()))
    if unknown:  # a misspelt name would otherwise silently leave its weight unfloored
        raise MansuError(f"{len(unknown)} name(s) in `original` are not in the model, e.g. {unknown[0]!r}")
    params = dict(model.named_parameters())
    per_tensor, changed, kept = {}, 0, 0
    for name, transposed in quantized_weights(model).items():
        if name not in original:
            continue
        p, before = params[name], original[name].to(params[name].device, params[name].dtype)
        n_changed = int((p.data != before).sum())
        if not n_changed:
            continue
        new = floor_update(quantized_layout(before, transposed), quantized_layout(p.data, transposed),
                           fmt, margin=margin, mode=mode)
        p.data.copy_(quantized_layout(new, transposed))
        n_kept = int((p.data != before).sum())
        per_tensor[name] = {"changed": n_changed, "kept": n_kept}
        changed, kept = changed + n_changed, kept + n_kept
    return FloorStats(fmt.name, mode, changed, kept, changed - kept, per_tensor)
