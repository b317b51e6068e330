"""Diagonal Fisher of the retain set over a parameter mask, and the retain bound 0.5 * sum F_i delta_i^2.

F_i = mean over retain items of (d log p(answer | prompt) / d theta_i)^2, each item's own gradient
(mansu.layer_grads reads them from a batched backward): the square of a batch-mean gradient is not the
Fisher (it drops the per-example variance that makes up most of it). "empirical" uses the real
answer tokens; "true" samples each answer token from the model's own prediction at that position
(teacher-forced on the real prefix), which makes the estimate the model's Fisher: the Hessian of the
retain KL divergence, at any weights. The empirical Fisher matches the Hessian of the retain NLL only
near a minimum. Only the masked entries are ever stored.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .data import Batch, Item, batches
from .config import check_types
from .errors import MansuError
from .evaluation import answer_logprob
from .models import input_device, require_loaded
from .layer_grads import layer_grads, sites
from .results import Result

Mask = dict[str, torch.Tensor]
Update = dict[str, torch.Tensor]
FISHER_KINDS = ("empirical", "true")
BOUND_MODES = ("prune", "scale")


@dataclass
class FisherConfig:
    """How the diagonal Fisher is estimated."""

    kind: str = "empirical"  # "empirical": real answer tokens; "true": answer tokens sampled from the model
    samples: int = 1  # sampled label sets per item for kind="true" (one forward, one backward each)
    seed: int = 0  # for the sampled labels
    batch_size: int = 16  # items per forward and backward (one, when a selected parameter is not a Linear/Conv1D
    # weight or bias: autograd sums a batch's gradients); the memory of one batch's activations

    def __post_init__(self) -> None:
        check_types(self)
        if self.kind not in FISHER_KINDS:
            raise MansuError(f"unknown Fisher kind {self.kind!r}; choose one of {FISHER_KINDS}")
        if self.samples < 1 or self.batch_size < 1:
            raise MansuError(f"samples and batch_size must be >= 1, got {self.samples} and {self.batch_size}")


@dataclass
class BoundConfig:
    """Keep an update's retain-loss estimate within `budget` by pruning costly entries or scaling it."""

    budget: float  # allowed 0.5 * sum F_i delta_i^2, in nats of mean retain answer NLL per item
    mode: str = "prune"  # "prune": keep the cheapest entries; "scale": shrink the whole update

    def __post_init__(self) -> None:
        check_types(self)
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise MansuError(f"budget must be a positive number, got {self.budget}")
        if self.mode not in BOUND_MODES:
            raise MansuError(f"unknown bound mode {self.mode!r}; choose one of {BOUND_MODES}")


@dataclass(repr=False)
class Fisher(Result):
    """Diagonal Fisher values (fp32) of the masked entries: `values[name]` is 1-D, in `mask[name]`'s flat order,
    on the parameter's device, as are its mask and gradient."""

    mask: Mask
    values: dict[str, torch.Tensor]
    grad: dict[str, torch.Tensor]  # mean gradient of the real answers' log-likelihood, same layout
    kind: str
    n: int  # retain items averaged over

    def summary(self) -> dict:
        entries = sum(v.numel() for v in self.values.values())
        total = sum(v.double().sum().item() for v in self.values.values())
        return {"kind": self.kind, "n": self.n, "params": len(self.values), "entries": entries,
                "mean": total / max(entries, 1)}

    def to_dict(self) -> dict:
        return self.summary()  # the tensors are too large for JSON

    def dense(self, name: str) -> torch.Tensor:
        """F of parameter `name` at full shape, zero outside the mask."""
        out = torch.zeros(self.mask[name].shape, dtype=torch.float32, device=self.values[name].device)
        out[self.mask[name]] = self.values[name]
        return out

    def entry_costs(self, update: Update) -> dict[str, torch.Tensor]:
        """0.5 * F_i * delta_i^2 per masked entry; refuses an update that moves entries whose F is unknown."""
        costs = {}
        for name, delta in update.items():
            mask = self.mask.get(name)
            if mask is None:
                if delta.any():
                    raise MansuError(f"the update moves {name!r}, for which no Fisher was computed")
                continue
            if mask.shape != delta.shape:
                raise MansuError(f"update of {name!r} has shape {tuple(delta.shape)}, the mask {tuple(mask.shape)}")
            mask = mask.to(delta.device)
            if delta[~mask].any():
                raise MansuError(f"the update moves entries of {name!r} outside the Fisher's mask")
            costs[name] = self.entry_cost(name, delta.detach().float()[mask])
        return costs

    def entry_cost(self, name: str, entries: torch.Tensor) -> torch.Tensor:
        """0.5 * F_i * delta_i^2 for a flat vector of deltas over `name`'s masked entries, in mask order."""
        return 0.5 * self.values[name] * entries.to(self.values[name].device) ** 2

    def cost(self, update: Update) -> float:
        """The retain bound: the curvature term 0.5 * sum F_i delta_i^2 of `update`'s retain-NLL increase."""
        return sum(c.double().sum().item() for c in self.entry_costs(update).values())

    def predicted_change(self, update: Update) -> float:
        """Second-order estimate of the mean retain answer NLL change: -grad . delta + cost."""
        costs = self.entry_costs(update)
        first = 0.0
        for n in costs:
            moved = update[n].detach().double()[self.mask[n].to(update[n].device)]
            first += (self.grad[n].double() * moved.to(self.grad[n].device)).sum().item()
        return sum(c.double().sum().item() for c in costs.values()) - first


def sampled_answer_logprobs(model: torch.nn.Module, batch: Batch, generator: torch.Generator,
                            draws: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """From one forward: the real answers' log-likelihood [B] and `draws` of model-sampled answers [B]."""
    # Each answer token is drawn on the real prefix (teacher-forced), so the draws' per-token scores are
    # independent with zero mean and the squared gradient estimates the sum of the tokens' Fishers.
    batch = batch.to(input_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    batch = batch.to(logprobs.device)  # the output head may sit on another device than the embeddings
    probs = logprobs.detach().exp().flatten(0, 1).to(generator.device)  # a no-op unless the head is elsewhere
    sampled = torch.multinomial(probs, draws, replacement=True, generator=generator).T  # one call: it is slow
    labels = [batch.input_ids[:, 1:]] + [y.view(logprobs.shape[:2]).to(logprobs.device) for y in sampled]
    scores = [(logprobs.gather(-1, y[..., None]).squeeze(-1) * batch.target_mask).sum(-1) for y in labels]
    return scores[0], scores[1:]


def flat_index(mask: torch.Tensor) -> torch.Tensor:
    """The entries `mask` selects as flat indices, in the order `tensor[mask]` gives them."""
    return mask.reshape(-1).nonzero().squeeze(1)


@contextmanager
def masked_grad_hooks(params: dict[str, torch.nn.Parameter], index: dict[str, torch.Tensor],
                      take: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """During backward, hand each parameter's gradient entries at `index[name]` (`flat_index`) to `take(name,
    entries)` and free the gradient at once. Indices found once, not a boolean mask: a mask is searched again on
    every backward (a quarter of the Fisher's time on the embedded model; the same values, in the same order)."""
    stash = {n: p.grad for n, p in params.items()}  # a caller's own gradients are put back afterwards

    def hook(name: str) -> Callable:
        def fn(p: torch.nn.Parameter) -> None:
            take(name, p.grad.reshape(-1).index_select(0, index[name]))
            p.grad = None  # so memory holds one full-size gradient at a time, not one per selected weight

        return fn

    handles = []
    try:
        for name, p in params.items():
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.grad = stash[name]


def full_mask(model: torch.nn.Module) -> Mask:
    """A mask selecting every parameter entry (memory grows with the whole model: for small models)."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def diagonal_fisher(model: torch.nn.Module, tokenizer, items: Sequence[Item], mask: Mask | None = None,
                    config: FisherConfig | None = None, progress: bool = True) -> Fisher:
    """The retain set's diagonal Fisher over `mask` (all parameters if None), accumulated in fp32 on each
    parameter's device."""
    config = config or FisherConfig()
    if not items:
        raise MansuError("cannot compute a Fisher over an empty retain set")
    mask = full_mask(model) if mask is None else mask
    params = dict(model.named_parameters())
    unknown = sorted(set(mask) - set(params))
    if unknown:
        raise MansuError(f"mask names parameters the model does not have: {unknown[:3]}")
    selected = {n: m.to(params[n].device, torch.bool) for n, m in mask.items() if m.any()}
    if not selected:
        raise MansuError("the mask selects no parameter entries")
    for name, m in selected.items():
        if m.shape != params[name].shape:
            raise MansuError(f"mask of {name!r} has shape {tuple(m.shape)}, the parameter {tuple(params[name].shape)}")
    require_loaded(model, selected)
    squares = {n: torch.zeros(int(mask[n].bool().sum()), dtype=torch.float32, device=m.device)
               for n, m in selected.items()}
    grad_sums = {n: torch.zeros_like(v) for n, v in squares.items()}
    generator = torch.Generator(input_device(model)).manual_seed(config.seed) if config.kind == "true" else None
    # Linear/Conv1D weights and biases give per-item gradients from a batched backward (mansu.layer_grads); any
    # other selected parameter takes autograd's gradient, which sums a batch: then one item per backward.
    index = {n: flat_index(m) for n, m in selected.items()}
    layers = sites(model, index)
    others = {n: params[n] for n in selected if n not in layers}
    batch_size = config.batch_size if not others else 1
    real_labels = True  # whether the running backward is of the real answers (else of sampled ones)

    def take(name: str, grads: torch.Tensor) -> None:  # grads: [items, the entries of `name` selected]
        if real_labels:
            grad_sums[name] += grads.sum(0)
        if not real_labels or config.kind == "empirical":
            squares[name] += (grads**2).sum(0)

    was_training, flags = model.training, {n: p.requires_grad for n, p in params.items()}
    model.eval()  # no dropout: the Fisher of the deployed (eval-mode) model
    try:
        # Only the others take weight gradients: backward skips the weight matmuls of everything else.
        for name, p in params.items():
            p.requires_grad_(name in others)
        chunks = list(batches(tokenizer, items, batch_size))
        with (layer_grads(model, layers, take),
              masked_grad_hooks(others, index,
                                lambda name, g: take(name, g.float()[None]))):
            for batch in tqdm(chunks, desc="fisher", leave=False, disable=not progress):
                if config.kind == "empirical":
                    real, draws = answer_logprob(model, batch), []
                else:
                    real, draws = sampled_answer_logprobs(model, batch, generator, config.samples)
                for k, logp in enumerate([real] + draws):
                    real_labels = k == 0
                    logp.sum().backward(retain_graph=k < len(draws))
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
        model.train(was_training)
    n = len(items) * (config.samples if config.kind == "true" else 1)
    return Fisher(mask=selected, values={k: v / n for k, v in squares.items()},
                  grad={k: v / len(items) for k, v in grad_sums.items()}, kind=config.kind, n=len(items))


@dataclass(repr=False)
class BoundedUpdate(Result):
    """An update cut down to a retain budget, with its estimated cost before and after."""

    update: Update
    cost: float
    original_cost: float
    budget: float
    mode: str
    scale: float  # factor applied ("scale" mode; 1.0 when pruning)
    kept: int  # nonzero entries left
    total: int  # nonzero entries before

    def to_dict(self) -> dict:
        return self.summary()


def bound_update(fisher: Fisher, update: Update, config: BoundConfig) -> BoundedUpdate:
    """Scale `update`, or keep only its cheapest entries (by 0.5 F_i delta_i^2), so the estimate <= budget."""
    costs = fisher.entry_costs(update)
    original = sum(c.double().sum().item() for c in costs.values())
    total = sum(int(d.count_nonzero()) for d in update.values())
    out = {name: d.clone() for name, d in update.items()}
    if original <= config.budget:
        return BoundedUpdate(out, original, original, config.budget, config.mode, 1.0, total, total)
    if config.mode == "scale":
        scale = math.sqrt(config.budget / original)  # the cost is quadratic in the update
        out = {name: d * scale for name, d in out.items()}
        return BoundedUpdate(out, original * scale**2, original, config.budget, "scale", scale, total, total)
    # Prune: the cost is a sum over entries, so keeping the cheapest prefix keeps the most entries.
    names = list(costs)
    here = costs[names[0]].device  # the cheapest entries are chosen over all parameters, on one device
    flat = torch.cat([costs[n].double().to(here) for n in names])
    order = torch.argsort(flat)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[: int((flat[order].cumsum(0) <= config.budget).sum())]] = True
    start = 0
    for name in names:
        m = fisher.mask[name].to(out[name].device)
        values = out[name][m]
        out[name][m] = values * keep[start : start + values.numel()].to(values.device, values.dtype)
        start += values.numel()
    cost = flat[keep].sum().item()
    kept = sum(int(d.count_nonzero()) for d in out.values())
    return BoundedUpdate(out, cost, original, config.budget, "prune", 1.0, kept, total)
