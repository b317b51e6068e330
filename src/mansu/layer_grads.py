"""Gradients at selected entries of Linear and Conv1D weights and biases, read from layer hooks during backward.

A layer's weight gradient is a sum over tokens of (output gradient) x (input) outer products. Only the rows x
columns block around the selected entries is ever formed (a head's rows, a neuron's column), on the layer's
device, in fp32, and no weight takes an autograd gradient: autograd would form every circuit tensor's whole
gradient. Kept apart per item instead of summed over the batch, it is each item's gradient, for the batch's cost:
the diagonal Fisher needs these (the mean of the items' squared gradients, not the square of their mean); the
edit's rounds need the batch's sum.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import MansuError
from .hooks import forward_hooks
from .projection import linear_like

Take = Callable[[str, torch.Tensor], None]  # (parameter name, its gradient entries) as backward reaches it


@dataclass(frozen=True)
class Site:
    """Where a selected parameter's gradient is read: its layer's name (the same in any copy of the model, so one
    site serves the twin and the exam copies too), and the selected entries' block."""

    module: str
    bias: bool
    rows: torch.Tensor  # output features holding a selected entry
    cols: torch.Tensor | None  # input features holding one (a weight's)
    where: torch.Tensor  # each selected entry's place in the flattened rows x cols block, in the mask's order


def sites(model: nn.Module, index: dict[str, torch.Tensor]) -> dict[str, Site]:
    """A `Site` for every parameter of `index` (its selected entries as `fisher.flat_index` gives them) that is a
    Linear or Conv1D weight or bias; others are left out."""
    out = {}
    for name, flat in index.items():
        module_name, _, attr = name.rpartition(".")
        _, module, conv1d = linear_like(model, f"{module_name}.weight")
        if attr not in ("weight", "bias") or module is None:
            continue
        if attr == "bias":
            out[name] = Site(module_name, True, flat, None, torch.arange(len(flat), device=flat.device))
            continue
        stored_cols = module.weight.shape[1]
        first, second = flat // stored_cols, flat % stored_cols
        row, col = (second, first) if conv1d else (first, second)  # output feature, input feature
        rows, cols = row.unique(), col.unique()
        where = torch.searchsorted(rows, row) * len(cols) + torch.searchsorted(cols, col)
        out[name] = Site(module_name, False, rows, cols, where)
    return out


@contextmanager
def layer_grads(model: nn.Module, found: dict[str, Site], take: Take, per_item: bool = True) -> Iterator[None]:
    """During every backward in the block, hand `take(name, grads)` each site's gradient entries (fp32) as backward
    reaches its layer: per item ([items, selected]), or summed over the batch ([selected]; a layer run twice in
    one forward hands over each call's part). The input embeddings' output is made to require grad, so backward
    reaches every layer with no parameter taking a gradient."""
    calls: dict[str, int] = {}  # per site, calls of its layer in this forward
    read_grads = entries if per_item else summed

    def read(name: str, site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = args[0].detach()
            if per_item:  # summed over the batch, any input shape and any number of calls add up
                if x.dim() != 3:  # e.g. a mixture of experts' layer, fed the tokens routed from every item
                    raise MansuError(f"per-item gradients of {name!r} need its input as [items, tokens, features], "
                                     f"got shape {tuple(x.shape)}")
                calls[name] = calls.get(name, 0) + 1
                if calls[name] > 1:  # its parts would have to be summed before squaring
                    raise MansuError(f"{name!r}'s layer runs twice in one forward; per-item gradients need it once")
            output.register_hook(lambda grad: take(name, read_grads(site, x, grad)))

        return hook

    def grad_from_here(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        calls.clear()  # a new forward begins
        return None if output.requires_grad else output.detach().requires_grad_()

    hooks = [(model.get_input_embeddings(), grad_from_here)]
    hooks += [(model.get_submodule(site.module), read(name, site)) for name, site in found.items()]
    with forward_hooks(hooks):
        yield


def entries(site: Site, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per item, the gradient at the site's selected entries, from the layer's input and output gradient."""
    out_grad = grad.float()[..., site.rows]  # [items, tokens, rows]
    if site.bias:
        return out_grad.sum(1)
    block = torch.einsum("btr,btc->brc", out_grad, x.float()[..., site.cols])
    return block.reshape(len(block), -1)[:, site.where]


def summed(site: Site, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The batch's gradient at the site's selected entries: every token's part summed, as autograd's is."""
    out_grad = grad.float()[..., site.rows].reshape(-1, len(site.rows))  # [tokens, rows]
    if site.bias:
        return out_grad.sum(0)
    block = out_grad.T @ x.float()[..., site.cols].reshape(-1, len(site.cols))
    return block.reshape(-1)[site.where]
