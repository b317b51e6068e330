"""A base for result dataclasses: short repr, HTML table for notebooks, to_dict() and JSON."""
from __future__ import annotations

import dataclasses
import html
import math
import os
from pathlib import Path
from typing import Any

import torch

from .files import write_json


def to_jsonable(value: Any) -> Any:
    """Turn dataclasses, tensors, tuples and paths into plain JSON values (NaN becomes None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else to_jsonable(dataclasses.asdict(value))
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Result:
    """Mixin for result dataclasses; `summary()` names the few numbers a person looks at first."""

    def summary(self) -> dict[str, Any]:
        """The headline numbers: by default every scalar field."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), (int, float, str, bool, type(None)))
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON values."""
        return {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` to `path` atomically."""
        return write_json(path, self.to_dict())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_short(v)}" for k, v in self.summary().items())
        return f"{type(self).__name__}({fields})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(_short(v))}</td></tr>"
            for k, v in self.summary().items()
        )
        return f"<table><caption>{type(self).__name__}</caption>{rows}</table>"
