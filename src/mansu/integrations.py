"""A Hugging Face `Trainer` callback that makes a Trainer-based unlearning recipe quantization-permanent.

    callback = mansu.integrations.MansuCallback(tokenizer, forget, retain)
    trainer.add_callback(callback)      # snapshot at train begin; `mansu.harden` at train end
    trainer.train(); print(callback.result.certificate.table())

transformers is imported here only (mansu's core never needs a Trainer).
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import TrainerCallback

from .data import Item
from .errors import MansuError
from .hardening import HardenConfig, harden
from .pipeline import UnlearnResult
from .quant import quantized_weights


class MansuCallback(TrainerCallback):
    """Snapshots the original quantized weights when training begins and hardens the trained model when it
    ends (`mansu.harden`, in place); the hardening's result is kept as `result`."""

    def __init__(self, tokenizer, forget: Sequence[Item], retain: Sequence[Item],
                 config: HardenConfig | None = None):
        self.tokenizer, self.forget, self.retain = tokenizer, list(forget), list(retain)
        self.config = config or HardenConfig()
        self.result: UnlearnResult | None = None
        self._original: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if hasattr(model, "merge_and_unload"):  # a PEFT model: its adapters must be merged before hardening
            raise MansuError("MansuCallback hardens full models; for PEFT adapters, merge_and_unload() after "
                             "training and call mansu.harden (see examples/peft_lora.py)")
        params = dict(model.named_parameters())
        # On the CPU: the snapshot must not take accelerator memory from the training it watches.
        self._original = {n: params[n].detach().to("cpu", copy=True) for n in quantized_weights(model)}

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        if self._original is None:
            raise MansuError("MansuCallback saw the end of a training whose beginning it did not see")
        was_training = model.training
        model.eval()
        try:
            self.result = harden(model, self._original, self.tokenizer, self.forget, self.retain, self.config)
        finally:
            model.train(was_training)
            self._original = None
