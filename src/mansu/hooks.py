"""Hooks on plain Hugging Face modules, always inside a context manager that removes them in `finally`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Register `(module, fn)` forward hooks (pre-hooks if `pre`) for the duration of the block."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], detach: bool = True) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the first positional input of each named module on every forward call in the block."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            seen[name].append(args[0].detach() if detach else args[0])

        return hook

    with forward_hooks(((m, recorder(n)) for n, m in modules.items()), pre=True):
        yield seen
