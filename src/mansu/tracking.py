"""Round logging to TensorBoard or Weights & Biases, without depending on either.

    writer = torch.utils.tensorboard.SummaryWriter("runs/mansu")     # or: run = wandb.init(project="mansu")
    mansu.unlearn(model, tokenizer, forget, retain, callback=mansu.log_rounds(writer))
"""
from __future__ import annotations

import math
from typing import Any

from .errors import MansuError
from .methods import RoundCallback


def _numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The record's finite numeric fields (bools as 0/1) under `prefix`; the round itself is the step."""
    return {prefix + k: float(v) for k, v in record.items()
            if k != "round" and isinstance(v, (int, float)) and math.isfinite(v)}


def log_rounds(writer: Any, prefix: str = "unlearn/") -> RoundCallback:
    """A callback for `unlearn(..., callback=)` that writes each round's numbers to `writer` at step = round:
    `writer.add_scalar(tag, value, step)` (a TensorBoard `SummaryWriter`, or alike) or `writer.log(dict,
    step=step)` (a wandb run, or the `wandb` module). It never stops the run."""
    if callable(getattr(writer, "add_scalar", None)):
        def write(record: dict[str, Any]) -> None:
            for tag, value in _numbers(record, prefix).items():
                writer.add_scalar(tag, value, record["round"])
    elif callable(getattr(writer, "log", None)):
        def write(record: dict[str, Any]) -> None:
            writer.log(_numbers(record, prefix), step=record["round"])
    else:
        raise MansuError(f"log_rounds needs a TensorBoard SummaryWriter (add_scalar) or a wandb run (log), "
                         f"got {type(writer).__name__}")
    return write
