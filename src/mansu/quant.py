"""Quantization formats, bin geometry, quantize-and-check (the permanence certificate) and PTQ evaluation.

Every format is blockwise: a weight's value after quantization is `scale * levels[code] + offset`, with one
scale (and offset) per block and `levels` sorted, so a code is also the index of the weight's bin. The
encoders are plain torch, checked bit for bit against bitsandbytes (nf4, fp4, int8) and the `gguf` package
(q4_0, q4_1, q8_0) in the tests. Weights are handled in the layout the quantizer sees (see docs/quant.md).
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import MansuError
from .results import Result

# bitsandbytes.functional.get_4bit_type("nf4"), exactly (float32 values).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# bitsandbytes' FP4 table in its code order (code 8 is a second zero); sorted below, codes mapped back.
FP4_CODE_TABLE = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
                  0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
                  -0.3333333432674408, -0.5, -0.1666666716337204, -0.25)
_INT8_RECIP = 7.874015718698502e-3  # bitsandbytes dequantizes int8 by multiplying with 1/127 as this constant


@dataclass
class Encoded:
    """A tensor's blocks after encoding: `codes` [blocks, blocksize] index the sorted levels."""

    codes: Tensor
    scale: Tensor  # [blocks] float32: the multiplier decoding uses
    offset: Tensor | None = None  # [blocks] float32, q4_1's block minimum


@dataclass(frozen=True)
class Format:
    """One quantization format: block size, sorted levels, and its encode/decode on [blocks, blocksize]."""

    name: str
    blocksize: int  # weights per block; 0 means one block per row (LLM.int8's row-wise absmax)
    levels: tuple[float, ...]
    encode_blocks: Callable[[Tensor, bool], Encoded]  # (fp32 blocks, last block is a padded tail) -> Encoded
    decode_blocks: Callable[["Format", Encoded], Tensor]
    library_codes: tuple[int, ...] | None = None  # bin index -> the code the library stores, where they differ
    double_quant: bool = False
    absmax_scaled: bool = False  # the block scale is the block's absmax: the magnitude floor applies

    def levels_tensor(self) -> Tensor:
        return torch.tensor(self.levels, dtype=torch.float32)

    def midpoints(self) -> Tensor:
        """The decision boundaries between adjacent levels, in normalised units."""
        lv = self.levels_tensor()
        return (lv[:-1] + lv[1:]) / 2


def _absmax(blocks: Tensor) -> Tensor:
    return torch.maximum(blocks.amax(1), -blocks.amin(1))  # two reductions beat abs() + amax on CPU


def _scaled(blocks: Tensor, absmax: Tensor, tail: bool) -> Tensor:
    """Blocks divided by their absmax, rounded exactly as bitsandbytes rounds them."""
    safe = absmax.clamp(min=1e-38)
    scaled = blocks * (1.0 / safe)[:, None]  # bitsandbytes multiplies by the reciprocal ...
    if tail:
        scaled[-1] = blocks[-1] / safe[-1]  # ... but divides in a partial last block
    return scaled


def _bins(blocks: Tensor, absmax: Tensor, tail: bool, mids: Tensor) -> Tensor:
    return torch.bucketize(_scaled(blocks, absmax, tail), mids, out_int32=True)


def _encode_4bit(levels: tuple[float, ...]) -> Callable[[Tensor, bool], Encoded]:
    mids = (torch.tensor(levels[:-1]) + torch.tensor(levels[1:])) / 2

    def encode(blocks: Tensor, tail: bool) -> Encoded:
        absmax = _absmax(blocks)
        return Encoded(_bins(blocks, absmax, tail, mids), absmax)

    return encode


def codes_at_scale(fmt: Format, blocks: Tensor, absmax: Tensor, tail: bool = False) -> Tensor:
    """Codes of an absmax-scaled format (nf4/fp4) for fp32 blocks under given block scales."""
    return _bins(blocks, absmax, tail, fmt.midpoints())


def _decode_4bit(fmt: Format, enc: Encoded) -> Tensor:
    scale = _double_quant(enc.scale) if fmt.double_quant else enc.scale
    return fmt.levels_tensor()[enc.codes] * scale[:, None]


def _double_quant(absmax: Tensor) -> Tensor:
    """The block scales bitsandbytes' double quantization keeps: absmax - mean, 8-bit dynamic, blocks of 256."""
    import bitsandbytes.functional as bnbf

    offset = absmax.mean()
    q, state = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    return bnbf.dequantize_blockwise(q, state) + offset


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)  # gguf: an all-zero block encodes with id = 0


def _encode_q4_0(blocks: Tensor, tail: bool) -> Encoded:
    # gguf: d = (the signed element of largest magnitude) / -8; q = trunc(x / d + 8.5), clipped to 0..15.
    peak = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))[:, 0]
    d = peak / -8
    q = (blocks * _inverse(d)[:, None] + 8.5).floor_().clamp_(0, 15)
    return Encoded(q.to(torch.int32), d.half().float())


def _encode_q4_1(blocks: Tensor, tail: bool) -> Encoded:
    lo, hi = blocks.amin(1), blocks.amax(1)
    d = (hi - lo) / 15
    q = ((blocks - lo[:, None]) * _inverse(d)[:, None] + 0.5).floor_().clamp_(0, 15)
    return Encoded(q.to(torch.int32), d.half().float(), lo.half().float())


def _encode_q8_0(blocks: Tensor, tail: bool) -> Encoded:
    d = blocks.abs().amax(1) / 127
    v = blocks * _inverse(d)[:, None]
    a = v.abs()
    whole = a.floor()
    q = torch.sign(v) * (whole + (2 * (a - whole)).floor_())  # gguf's np_roundf: half away from zero
    return Encoded((q + 128).to(torch.int32), d.half().float())


def _encode_int8(blocks: Tensor, tail: bool) -> Encoded:
    # LLM.int8 (Int8Params): weight cast to fp16, row absmax, round-half-even of x * 127 / absmax.
    rows = blocks.half().float()
    stats = rows.abs().amax(1)
    q = torch.round(rows * (127.0 / stats)[:, None]).nan_to_num_(0)
    return Encoded((q + 127).to(torch.int32), stats)


def _decode_int8(fmt: Format, enc: Encoded) -> Tensor:
    return (enc.codes - 127).float() * enc.scale[:, None] * _INT8_RECIP


def _decode_affine(fmt: Format, enc: Encoded) -> Tensor:
    out = fmt.levels_tensor()[enc.codes] * enc.scale[:, None]
    return out if enc.offset is None else out + enc.offset[:, None]


def _fp4_format(double_quant: bool) -> Format:
    order = torch.argsort(torch.tensor(FP4_CODE_TABLE), stable=True)
    levels = tuple(FP4_CODE_TABLE[i] for i in order.tolist())
    return Format("fp4-dq" if double_quant else "fp4", 64, levels, _encode_4bit(levels), _decode_4bit,
                  tuple(order.tolist()), double_quant, absmax_scaled=True)


FORMATS: dict[str, Format] = {
    "nf4": Format("nf4", 64, NF4_LEVELS, _encode_4bit(NF4_LEVELS), _decode_4bit, absmax_scaled=True),
    "nf4-dq": Format("nf4-dq", 64, NF4_LEVELS, _encode_4bit(NF4_LEVELS), _decode_4bit, double_quant=True,
                     absmax_scaled=True),
    "fp4": _fp4_format(False),
    "fp4-dq": _fp4_format(True),
    "int8": Format("int8", 0, tuple(float(i) for i in range(-127, 128)), _encode_int8, _decode_int8),
    "q4_0": Format("q4_0", 32, tuple(float(i) for i in range(-8, 8)), _encode_q4_0, _decode_affine),
    "q4_1": Format("q4_1", 32, tuple(float(i) for i in range(16)), _encode_q4_1, _decode_affine),
    "q8_0": Format("q8_0", 32, tuple(float(i) for i in range(-128, 128)), _encode_q8_0, _decode_affine),
}


def get_format(fmt: str | Format, blocksize: int | None = None) -> Format:
    """Look up a format by name (e.g. 'nf4', 'nf4-dq', 'q4_0'); `blocksize` overrides nf4/fp4's 64."""
    if isinstance(fmt, Format):
        out = fmt
    elif fmt in FORMATS:
        out = FORMATS[fmt]
    else:
        raise MansuError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if blocksize is not None and blocksize != out.blocksize:
        if not out.absmax_scaled:
            raise MansuError(f"format {out.name} has a fixed block size ({out.blocksize or 'one row'})")
        out = replace(out, blocksize=blocksize)
    return out


def parse_formats(spec: str | Sequence[str | Format]) -> list[Format]:
    """'nf4,q4_0' or a list of names -> formats, refusing unknown names."""
    names = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not names:
        raise MansuError(f"no quantization format given; choose from {', '.join(FORMATS)}")
    return [get_format(n) for n in names]


# ----------------------------------------------------------------------------- tensors <-> blocks

def to_blocks(w: Tensor, fmt: Format, dtype: torch.dtype | None = torch.float32) -> tuple[Tensor, bool]:
    """A weight (in quantized layout) as [blocks, blocksize] in `dtype` (None: w's own), zero-padded; and
    whether a tail was padded."""
    if fmt.blocksize == 0:
        return w.reshape(-1, w.shape[-1]).to(dtype or w.dtype), False
    if fmt.blocksize == 32 and w.shape[-1] % 32:  # gguf blocks run along rows
        raise MansuError(f"{fmt.name} needs rows that are a multiple of 32 long, got shape {tuple(w.shape)}")
    flat = w.reshape(-1).to(dtype or w.dtype)
    rem = flat.numel() % fmt.blocksize
    if rem:
        flat = torch.nn.functional.pad(flat, (0, fmt.blocksize - rem))
    return flat.view(-1, fmt.blocksize), bool(rem)


def encode(w: Tensor, fmt: str | Format = "nf4") -> Encoded:
    """Encode a weight given in the quantizer's layout ([out, in] for linear layers)."""
    fmt = get_format(fmt)
    return fmt.encode_blocks(*to_blocks(w, fmt))


def decode(enc: Encoded, fmt: str | Format, like: Tensor) -> Tensor:
    """The dequantized weight, shaped and typed like `like`."""
    fmt = get_format(fmt)
    return fmt.decode_blocks(fmt, enc).reshape(-1)[: like.numel()].reshape(like.shape).to(like.dtype)


def fake_quantize(w: Tensor, fmt: str | Format = "nf4") -> Tensor:
    """decode(encode(w)): what the deployed model computes with, in `w`'s dtype."""
    return decode(encode(w, fmt), fmt, w)


# ----------------------------------------------------------------------------- bin geometry

@dataclass
class BinGeometry:
    """Per weight: its code (bin index), block scale, and distances to the decision boundaries below/above.

    The outermost bins end at the outermost level (for nf4/fp4 the block's absmax): going further would
    change the block's scale instead of the code. Distances are in weight units, >= 0.
    """

    code: Tensor
    scale: Tensor
    down: Tensor
    up: Tensor

    @property
    def width(self) -> Tensor:
        """Width of each weight's bin."""
        return self.down + self.up


def _bounds(fmt: Format, enc: Encoded) -> tuple[Tensor, Tensor]:
    """Lower and upper edge of every weight's bin, in weight units, shaped like `enc.codes`."""
    lv = fmt.levels_tensor()
    edges = torch.cat([lv[:1], fmt.midpoints(), lv[-1:]])
    scale = enc.scale[:, None]
    a, b = edges[enc.codes] * scale, edges[enc.codes + 1] * scale
    if enc.offset is not None:
        a, b = a + enc.offset[:, None], b + enc.offset[:, None]
    return torch.minimum(a, b), torch.maximum(a, b)  # q4_0's scale can be negative


def bin_geometry(w: Tensor, fmt: str | Format = "nf4") -> BinGeometry:
    """Code, block scale and distance to the next boundary down and up for every weight of `w`."""
    fmt = get_format(fmt)
    blocks, tail = to_blocks(w, fmt)
    enc = fmt.encode_blocks(blocks, tail)
    lo, hi = _bounds(fmt, enc)

    def crop(t: Tensor) -> Tensor:  # drop the tail's padding, back to w's shape
        return t.reshape(-1)[: w.numel()].reshape(w.shape)

    return BinGeometry(crop(enc.codes), crop(enc.scale[:, None].expand_as(blocks)),
                       crop((blocks - lo).clamp_(min=0)), crop((hi - blocks).clamp_(min=0)))


# ----------------------------------------------------------------------------- which weights are quantized

def quantized_weights(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether it is stored transposed (GPT-2 Conv1D, [in, out]) for the weights that
    transformers' bitsandbytes integration quantizes: exact nn.Linear and Conv1D modules, minus the output
    head, tied weights and the last module (transformers' `get_keys_to_not_convert`)."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) if hasattr(model, "get_output_embeddings") else []
    out = {}
    for name, module in model.named_modules():
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
            out[f"{name}.weight"] = isinstance(module, Conv1D)
    return out


def quantized_layout(w: Tensor, transposed: bool) -> Tensor:
    """The weight as the quantizer sees it: transformers transposes Conv1D weights to [out, in] first."""
    return w.t() if transposed else w


def _state_and_layout(obj: Any, layout: Mapping[str, bool] | None) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """Accept a model, a state dict, or a model directory; return its tensors and the quantized set."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), dict(layout) if layout is not None else quantized_weights(obj)
    if isinstance(obj, (str, os.PathLike)):
        return _load_directory(Path(obj), layout)
    if isinstance(obj, Mapping):
        if layout is None:  # no modules to look at: 2-D weights other than embeddings and output heads
            layout = {k: False for k, v in obj.items() if k.endswith(".weight") and v.dim() == 2
                      and not any(s in k for s in ("embed", "lm_head", "wte", "wpe"))}
        return dict(obj), dict(layout)
    raise MansuError(f"expected a model, a state dict or a model directory, got {type(obj).__name__}")


def _load_directory(path: Path, layout: Mapping[str, bool] | None) -> tuple[dict[str, Tensor], dict[str, bool]]:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MansuError(f"no *.safetensors files in {path}")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(f))
    if layout is None:
        with torch.device("meta"):  # the module types decide what is quantized; no weights needed
            layout = quantized_weights(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))
    return state, dict(layout)


# ----------------------------------------------------------------------------- quantize-and-check

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


def _fused_absmax_counts(b: Tensor, a: Tensor, mids: Tensor) -> Tensor:
    """`_absmax_counts` compiled once per process (a dense check then costs about one bitsandbytes quantize);
    if the compiler is unavailable, warns once and counts eagerly: the same numbers, about 5x slower."""
    global _fused_kernel
    if _fused_kernel is None:
        _fused_kernel = torch.compile(_absmax_counts, dynamic=True)
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
        counts = _fused_absmax_counts(b[:full], a[:full], fmt.midpoints().to(b.device))
        return counts + _flip_counts(fmt, b[full:], a[full:], True, False) if tail else counts
    eb, ea = fmt.encode_blocks(b, tail), fmt.encode_blocks(a, tail)
    return _counts(b, a, eb.codes, ea.codes)


def _keeps_tail(rows: Tensor, n: int, tail: bool) -> bool:
    """Whether sorted block indices `rows` (of `n` blocks) keep the padded tail block, which stays last."""
    return tail and len(rows) > 0 and int(rows[-1]) == n - 1


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
        b, a, tail = b[touched], a[touched], _keeps_tail(touched, len(b), tail)
    b, a = b.float(), a.float()
    changed, flipped, recoded = _flip_counts(fmt, b, a, tail, fused).tolist()
    # The ratio distribution is estimated on a random sample of touched blocks (all of them for small edits).
    rows = torch.randperm(len(b), generator=gen)[: 64 + len(b) // 128].sort().values
    bs, as_ = b[rows], a[rows]
    lo, hi = _bounds(fmt, fmt.encode_blocks(bs, _keeps_tail(rows, len(b), tail)))
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
        ratio = torch.cat(ratios) if ratios else torch.empty(0)
        quantiles = {}
        if ratio.numel():
            ranks = [round(q * (len(ratio) - 1)) for q in _QUANTILES]
            ordered = np.partition(ratio.cpu().numpy(), ranks)  # a full sort costs 4x more here
            quantiles = {str(q): float(ordered[r]) for q, r in zip(_QUANTILES, ranks)}
        changed, flipped, collateral = totals
        out[fmt.name] = FormatCheck(fmt.name, changed, flipped, collateral,
                                    flipped / changed if changed else float("nan"),
                                    sum(sb[k].numel() for k in lay), per_tensor, quantiles,
                                    ratio[torch.randperm(len(ratio), generator=gen)[:4096]])
    return Certificate(out)



# ----------------------------------------------------------------------------- PTQ: quantized models

def quantized_copy(model: nn.Module, fmt: str | Format = "nf4", backend: str = "fake") -> nn.Module:
    """A deep copy of `model` quantized in `fmt`: 'fake' replaces each quantized weight by its dequantized
    value (every format); 'bnb' swaps in bitsandbytes Linear4bit / Linear8bitLt (nf4, fp4, int8 and -dq)."""
    fmt = get_format(fmt)
    if backend not in ("fake", "bnb"):
        raise MansuError(f"unknown backend {backend!r}; choose 'fake' or 'bnb'")
    layout = quantized_weights(model)
    out = copy.deepcopy(model)
    if backend == "fake":
        params = dict(out.named_parameters())
        with torch.no_grad():
            for name, transposed in layout.items():
                p = params[name]
                w = quantized_layout(p.data, transposed)
                p.data = quantized_layout(fake_quantize(w, fmt), transposed).contiguous()
        return out
    if fmt.name.startswith("q"):
        raise MansuError(f"the bnb backend has no {fmt.name}; use backend='fake'")
    for name, transposed in layout.items():
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        owner = out.get_submodule(parent)
        setattr(owner, child, _bnb_linear(getattr(owner, child), fmt, transposed))
    return out


def _bnb_linear(module: nn.Module, fmt: Format, transposed: bool) -> nn.Module:
    """A bitsandbytes layer computing in the module's dtype, quantized from the module's weight."""
    import bitsandbytes as bnb

    weight = quantized_layout(module.weight.data, transposed).contiguous()
    out_f, in_f = weight.shape
    dtype = weight.dtype
    bias = module.bias is not None
    if fmt.name == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias, compute_dtype=dtype, compress_statistics=fmt.double_quant,
                                  quant_type=fmt.name.removesuffix("-dq"))
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=fmt.blocksize,
                                         compress_statistics=fmt.double_quant, quant_type=fmt.name.removesuffix("-dq"))
        # On CPUs with AVX512-BF16, Linear4bit otherwise repacks the weight at the first no-grad call and
        # runs a fused kernel in bf16 (input and absmax rounded to bf16): not the model's dtype. See docs/quant.md.
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
    return layer.to(module.weight.device)


def evaluate_formats(
    model: nn.Module,
    tokenizer,
    items: Sequence,
    formats: str | Sequence[str | Format] = ("nf4",),
    backend: str = "fake",
    **eval_kwargs,
) -> dict[str, Any]:
    """`mansu.evaluate` on the full-precision model ('full') and on a quantized copy per format."""
    from .evaluate import evaluate

    out = {"full": evaluate(model, tokenizer, items, **eval_kwargs)}
    for fmt in parse_formats(formats) if formats else []:
        q = quantized_copy(model, fmt, backend)
        out[fmt.name] = evaluate(q, tokenizer, items, **eval_kwargs)
        del q
    return out

