"""PTQ evaluation: quantized copies of a model (dequantized weights or bitsandbytes layers) and their scores."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import MansuError
from .formats import Format, fake_quantize, get_format, parse_formats
from .layout import quantized_layout, quantized_weights


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
    from ..evaluation import evaluate

    out = {"full": evaluate(model, tokenizer, items, **eval_kwargs)}
    for fmt in parse_formats(formats) if formats else []:
        q = quantized_copy(model, fmt, backend)
        out[fmt.name] = evaluate(q, tokenizer, items, **eval_kwargs)
        del q
    return out
