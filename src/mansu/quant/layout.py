"""Which weights a quantizer converts, in which layout, and reading them from models, state dicts and
model directories."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import MansuError


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
