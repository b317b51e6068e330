"""Quantization formats: level tables, block encoders and decoders (checked bit for bit against their
libraries in the tests), and conversion between weights and blocks."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import MansuError

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

    def levels_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """The sorted levels, float32, on `device` (default: torch's default device)."""
        return _table(self.levels, device)

    def midpoints(self, device: torch.device | str | None = None) -> Tensor:
        """The decision boundaries between adjacent levels, in normalised units, on `device`."""
        return _table(_midpoints(self.levels), device)

    def edges(self, device: torch.device | str | None = None) -> Tensor:
        """The midpoints with the outermost levels around them: bin i spans edges[i]..edges[i + 1]; the
        outermost bins end at the outermost levels (for nf4/fp4 the block's absmax)."""
        return _table((self.levels[0], *_midpoints(self.levels), self.levels[-1]), device)


@functools.lru_cache(maxsize=None)
def _midpoints(levels: tuple[float, ...]) -> tuple[float, ...]:
    """The decision boundaries between adjacent levels, computed in float32 (and exact as Python floats)."""
    lv = torch.tensor(levels, dtype=torch.float32, device="cpu")  # even under a `torch.device("meta")` block
    return tuple(((lv[:-1] + lv[1:]) / 2).tolist())


def _table(values: tuple[float, ...], device: torch.device | str | None) -> Tensor:
    """`values` as float32 on `device` (None: torch's default device); one tensor per device, shared by every
    caller, so never write to it."""
    return _cached_table(values, torch.device(device) if device is not None else torch.get_default_device())


@functools.lru_cache(maxsize=None)
def _cached_table(values: tuple[float, ...], device: torch.device) -> Tensor:
    # Made once per device: copying a table to a GPU at every call would wait for the GPU each time.
    return torch.tensor(values, dtype=torch.float32, device=device)


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
    mids = _midpoints(levels)

    def encode(blocks: Tensor, tail: bool) -> Encoded:
        absmax = _absmax(blocks)
        return Encoded(_bins(blocks, absmax, tail, _table(mids, blocks.device)), absmax)

    return encode


def codes_at_scale(fmt: Format, blocks: Tensor, absmax: Tensor, tail: bool = False) -> Tensor:
    """Codes of an absmax-scaled format (nf4/fp4) for fp32 blocks under given block scales."""
    return _bins(blocks, absmax, tail, fmt.midpoints(blocks.device))


def block_scales(fmt: Format, absmax: Tensor) -> Tensor:
    """The per-block multipliers decoding uses, from every block's absmax: double-quantized where the format is
    (over the whole tensor's scales: re-encoding a part of it would change their mean and groups of 256)."""
    return _double_quant(absmax) if fmt.double_quant else absmax


def block_absmax(w: Tensor, fmt: Format) -> Tensor:
    """Every block's absmax of a weight in the quantizer's layout, fp32: its scales, without encoding it."""
    return _absmax(to_blocks(w, fmt)[0])


def _decode_4bit(fmt: Format, enc: Encoded) -> Tensor:
    return fmt.levels_tensor(enc.codes.device)[enc.codes] * block_scales(fmt, enc.scale)[:, None]


def _double_quant(absmax: Tensor) -> Tensor:
    """The block scales bitsandbytes' double quantization keeps: absmax - mean, 8-bit dynamic, blocks of 256."""
    import bitsandbytes.functional as bnbf

    offset = absmax.mean()
    # Given no map, bitsandbytes caches its 8-bit map process-wide on the device of its first call: after a first
    # call on meta, no later call could copy it back. So the map is passed, on the scales' device.
    code = _table(_dynamic_map(), absmax.device)
    q, state = bnbf.quantize_blockwise(absmax - offset, code=code, blocksize=256)
    return bnbf.dequantize_blockwise(q, state) + offset


@functools.lru_cache(maxsize=None)
def _dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' default 8-bit map for blockwise quantization (what double quantization uses)."""
    import bitsandbytes.functional as bnbf

    return tuple(bnbf.create_dynamic_map().tolist())


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
    out = fmt.levels_tensor(enc.codes.device)[enc.codes] * enc.scale[:, None]
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


def keeps_tail(rows: Tensor, n: int, tail: bool) -> bool:
    """Whether sorted block indices `rows` (of `n` blocks) keep the padded tail block, which stays last."""
    return tail and len(rows) > 0 and int(rows[-1]) == n - 1


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
