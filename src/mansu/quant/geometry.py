"""Bin geometry: each weight's bin and its distance to the decision boundaries below and above."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .formats import Encoded, Format, get_format, to_blocks


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
    edges = fmt.edges(enc.codes.device)
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
