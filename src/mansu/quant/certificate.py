"""Quantize-and-check: the permanence certificate, with a fused compiled kernel for large nf4/fp4 edits."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MansuError
from ..results import Result
from .formats import Format, _absmax, _scaled, keeps_tail, parse_formats, to_blocks
from .geometry import _bounds
from .layout import _state_and_layout, quantized_layout, quantized_weights

_QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


@dataclass(repr=False)
class FormatCheck(Result):
    """One format's verdict on an edit: changed weights, how many flipped their code, and collateral flips."""

    format: str
    changed: int
    flipped: int
    collateral: int
    fraction: float  # flipped / changed (NaN when nothing changed)
    checked: int  # quantized weights compared
    per_tensor: dict[str, dict[str, int]] = field(default_factory=dict)
    # |update| / bin width of changed weights at these quantiles, over a sample of touched blocks (all of
    # a tensor's when it has at most 64, else 64 + 1/128 of them)
    ratio_quantiles: dict[str, float] = field(default_factory=dict)
    ratio_sample: Tensor = field(default_factory=lambda: torch.empty(0))  # for a histogram, <= 4096 values

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("format", "changed", "flipped", "collateral", "fraction")}

    @property
    def certified(self) -> bool:
        """Every changed weight flipped and nothing else did."""
        return self.flipped == self.changed and self.collateral == 0


@dataclass(repr=False)
class Certificate(Result):
    """The permanence certificate: one `FormatCheck` per format."""

    formats: dict[str, FormatCheck]

    def summary(self) -> dict[str, Any]:
        return {name: f"{c.flipped}/{c.changed} flipped, {c.collateral} collateral" for name, c in self.formats.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"formats": {name: c.to_dict() for name, c in self.formats.items()}}

    def __getitem__(self, name: str) -> FormatCheck:
        return self.formats[name]

    @property
    def certified(self) -> bool:
        return all(c.certified for c in self.formats.values())

    def table(self) -> str:
        """A plain-text table, one row per format."""
        head = f"{'format':<8} {'changed':>10} {'flipped':>10} {'collateral':>10} {'fraction':>9} {'median |d|/bin':>15}"
        rows = [head]
        for c in self.formats.values():
            median = c.ratio_quantiles.get("0.5", float("nan"))
            rows.append(f"{c.format:<8} {c.changed:>10} {c.flipped:>10} {c.collateral:>10} {c.fraction:>9.4f} {median:>15.4g}")
        return "\n".join(rows)


def _counts(b: Tensor, a: Tensor, codes_b: Tensor, codes_a: Tensor) -> Tensor:
    """[changed, flipped (changed and recoded), recoded] for blocks before/after and their codes."""
    moved, flips = b != a, codes_b != codes_a
    return torch.stack([moved.sum(), (flips & moved).sum(), flips.sum()])


def _absmax_counts(b: Tensor, a: Tensor, mids: Tensor) -> Tensor:
    """`_counts` for an absmax-scaled format over full blocks, written so that torch.compile fuses it into one
    pass: a code is the number of boundaries below the scaled value, which is what `torch.bucketize` returns."""
    def codes(x: Tensor) -> Tensor:
        scaled = _scaled(x, _absmax(x), tail=False)
        code = (scaled > mids[0]).to(torch.int32)  # int32: int8 sums compile to slow conversions
        for i in range(1, len(mids)):
            code = code + (scaled > mids[i]).to(torch.int32)
        return code

    return _counts(b, a, codes(b), codes(a))


# A check re-encoding fewer blocks than this (64M weights) runs eagerly: there, compiling (about 3 s, 20 s on a
# cold cache) would cost more than the fused kernel saves (about 20 ns a weight). See docs/quant.md.
_FUSED_MIN_BLOCKS = 1 << 20
_fused_kernel: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None


def _rounded_division() -> dict[str, bool]:
    """The inductor option that makes a compiled fp32 division round as eager torch's does, where torch has it."""
    from torch._inductor import config

    # Triton (inductor's GPU backend) otherwise divides approximately (div.full.f32, up to 2 ulp off), and one
    # ulp moves a weight on a decision boundary into the next bin; the CPU backend divides exactly either way.
    name = "eager_numerics.division_rounding"
    return {name: True} if name in config.get_config_copy() else {}


def _fused_absmax_counts(b: Tensor, a: Tensor, mids: Tensor) -> Tensor:
    """`_absmax_counts` compiled once per process (a dense check then costs about one bitsandbytes quantize);
    if the compiler is unavailable, warns once and counts eagerly: the same numbers, about 5x slower."""
    global _fused_kernel
    if _fused_kernel is None:
        _fused_kernel = torch.compile(_absmax_counts, dynamic=True, options=_rounded_division())
    try:
        return _fused_kernel(b, a, mids)
    except Exception as err:  # torch.compile raises its backend's errors (e.g. no C++ compiler) at the first call
        if _fused_kernel is _absmax_counts:
            raise
        warnings.warn(f"mansu.quant.check: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                      "counting code flips without it (same counts, slower)", RuntimeWarning, stacklevel=2)
        _fused_kernel = _absmax_counts
        return _absmax_counts(b, a, mids)


def _flip_counts(fmt: Format, b: Tensor, a: Tensor, tail: bool, fused: bool) -> Tensor:
    """[changed, flipped, recoded] between blocks `b` and `a`; a padded tail block is the last row."""
    full = len(b) - tail
    if fused and full > 1:  # torch.compile specialises sizes 0 and 1 (a recompile each): leave them eager
        counts = _fused_absmax_counts(b[:full], a[:full], fmt.midpoints(b.device))
        return counts + _flip_counts(fmt, b[full:], a[full:], True, False) if tail else counts
    eb, ea = fmt.encode_blocks(b, tail), fmt.encode_blocks(a, tail)
    return _counts(b, a, eb.codes, ea.codes)


def _touched_blocks(fmt: Format, before: Tensor, after: Tensor) -> Tensor:
    """Indices of the blocks in which an edit changed at least one weight: only they can change a code."""
    if before.shape != after.shape:
        raise MansuError(f"shape mismatch: {tuple(before.shape)} vs {tuple(after.shape)}")
    return to_blocks(before != after, fmt, None)[0].any(1).nonzero()[:, 0]


def _check_tensor(fmt: Format, before: Tensor, after: Tensor, touched: Tensor, fused: bool,
                  gen: torch.Generator) -> tuple[int, int, int, Tensor]:
    """(changed, flipped, collateral, |update| / bin width for the changed weights of sampled blocks)."""
    b, tail = to_blocks(before, fmt, None)
    a, _ = to_blocks(after, fmt, None)
    if len(touched) < len(b):  # select before converting: a sparse edit converts only its blocks
        b, a, tail = b[touched], a[touched], keeps_tail(touched, len(b), tail)
    b, a = b.float(), a.float()
    changed, flipped, recoded = _flip_counts(fmt, b, a, tail, fused).tolist()
    # The ratio distribution is estimated on a random sample of touched blocks (all of them for small edits).
    rows = torch.randperm(len(b), generator=gen)[: 64 + len(b) // 128].sort().values
    picked = rows.to(b.device)  # drawn on the CPU, so that every device samples the same blocks
    bs, as_ = b[picked], a[picked]
    lo, hi = _bounds(fmt, fmt.encode_blocks(bs, keeps_tail(rows, len(b), tail)))
    moved = bs != as_
    ratio = (as_ - bs).abs()[moved] / (hi - lo)[moved]
    return changed, flipped, recoded - flipped, ratio


def check(
    before: Any,
    after: Any,
    formats: str | Sequence[str | Format] = ("nf4",),
    layout: Mapping[str, bool] | None = None,
) -> Certificate:
    """Quantize the weights an edit changed, before and after, and count code flips per format.

    `before`/`after`: models, state dicts or model directories. `layout` (name -> transposed) overrides
    which weights are checked; by default the set transformers' bitsandbytes integration quantizes.
    """
    if layout is None:  # a model knows which of its weights are quantized, and in which layout
        layout = next((quantized_weights(m) for m in (before, after) if isinstance(m, nn.Module)), None)
    sb, lay = _state_and_layout(before, layout)
    sa, _ = _state_and_layout(after, lay)
    missing = [k for k in lay if k not in sb or k not in sa]
    if missing:
        raise MansuError(f"{len(missing)} quantized weight(s) missing from a model, e.g. {missing[0]}")
    gen = torch.Generator().manual_seed(0)
    out = {}
    for fmt in parse_formats(formats):
        per_tensor, ratios, totals = {}, [], [0, 0, 0]
        pairs = {n: (quantized_layout(sb[n], t), quantized_layout(sa[n], t)) for n, t in lay.items()}
        touched = {n: _touched_blocks(fmt, *pair) for n, pair in pairs.items()}
        fused = fmt.absmax_scaled and sum(map(len, touched.values())) >= _FUSED_MIN_BLOCKS
        for name, (weight_before, weight_after) in pairs.items():
            counts = _check_tensor(fmt, weight_before, weight_after, touched[name], fused, gen)
            if counts[0] or counts[2]:
                per_tensor[name] = dict(zip(("changed", "flipped", "collateral"), counts[:3]))
            totals = [t + c for t, c in zip(totals, counts[:3])]
            ratios.append(counts[3])
        ratio = torch.cat([r.cpu() for r in ratios]) if ratios else torch.empty(0)  # a sample: small
        quantiles = {}
        if ratio.numel():
            ranks = [round(q * (len(ratio) - 1)) for q in _QUANTILES]
            ordered = np.partition(ratio.numpy(), ranks)  # a full sort costs 4x more here
            quantiles = {str(q): float(ordered[r]) for q, r in zip(_QUANTILES, ranks)}
        changed, flipped, collateral = totals
        out[fmt.name] = FormatCheck(fmt.name, changed, flipped, collateral,
                                    flipped / changed if changed else float("nan"),
                                    sum(sb[k].numel() for k in lay), per_tensor, quantiles,
                                    ratio[torch.randperm(len(ratio), generator=gen)[:4096]])
    return Certificate(out)
