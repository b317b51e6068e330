"""Quantization formats, bin geometry, quantize-and-check (the permanence certificate) and PTQ evaluation.

Every format is blockwise: a weight's value after quantization is `scale * levels[code] + offset`, with one
scale (and offset) per block and `levels` sorted, so a code is also the index of the weight's bin. The
encoders are plain torch, checked bit for bit against bitsandbytes (nf4, fp4, int8) and the `gguf` package
(q4_0, q4_1, q8_0) in the tests. Weights are handled in the layout the quantizer sees (see docs/quant.md).

Modules: `formats` (tables, encoders, decoders), `geometry` (bins and their boundaries), `layout` (which
weights are quantized, and reading models), `certificate` (`check`), `ptq` (quantized copies).
"""
from .certificate import Certificate, FormatCheck, check
from .formats import (FORMATS, FP4_CODE_TABLE, NF4_LEVELS, Encoded, Format, block_absmax, block_scales, codes_at_scale,
                      decode, encode, fake_quantize, get_format, keeps_tail, parse_formats, to_blocks)
from .geometry import BinGeometry, bin_geometry
from .layout import quantized_layout, quantized_weights
from .ptq import evaluate_formats, quantized_copy

__all__ = [
    # formats
    "FORMATS", "NF4_LEVELS", "FP4_CODE_TABLE", "Format", "Encoded", "get_format", "parse_formats", "to_blocks",
    "encode", "decode", "fake_quantize", "codes_at_scale", "block_absmax", "block_scales", "keeps_tail",
    # geometry and layout
    "BinGeometry", "bin_geometry", "quantized_weights", "quantized_layout",
    # the certificate and PTQ copies
    "check", "Certificate", "FormatCheck", "quantized_copy", "evaluate_formats",
]
