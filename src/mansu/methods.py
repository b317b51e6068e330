"""Forget objectives (gradient ascent, NPO) and the gradient baselines that quantization undoes.

`ga`: ascend the forget answers' NLL. `graddiff`: ascend on forget, descend on retain. `npo`: negative
preference optimisation (Zhang et al. 2024) on sequence log-probability ratios against the original
model, plus the retain NLL. Defaults are the utility-preserving ones the literature runs: small
learning rate, stop as soon as full-precision forget accuracy is low.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Batch, Item, batches, encode_items
from .config import check_types
from .errors import MansuError
from .evaluation import ChoiceBatch, answer_logprob, evaluate, fact_logprob

BASELINES = ("ga", "graddiff", "npo")
RoundCallback = Callable[[dict[str, Any]], Any]  # called with each round's record; a true return stops the run


def forget_loss(model: torch.nn.Module, batch: Batch | ChoiceBatch, objective: str,
                ref_logprob: torch.Tensor | None = None, beta: float = 0.1) -> torch.Tensor:
    """The loss whose descent forgets: mean `fact_logprob` (`ga`) or the NPO loss on it (needs `ref_logprob`)."""
    logprob = fact_logprob(model, batch)
    if objective == "ga":
        return logprob.mean()
    if objective == "npo":
        # NPO on whole-answer log-probability ratios, not on raw logits (a pitfall of released code).
        return (2.0 / beta) * F.softplus(beta * (logprob - ref_logprob.to(logprob.device))).mean()
    raise MansuError(f"unknown forget objective {objective!r}; choose 'ga' or 'npo'")


def retain_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean answer NLL on retain items: descending it keeps what must be kept."""
    return -answer_logprob(model, batch).mean()


@contextmanager
def seeded(seed: int, model: torch.nn.Module) -> Iterator[None]:
    """Torch's global RNG seeded with `seed` inside, and the caller's state restored after: dropout (a model in
    train mode) draws from the global generator and takes no generator of its own."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop with a clear error instead of training on NaN/inf."""
    if not torch.isfinite(loss):
        raise MansuError(f"the loss became {loss.item()} at step {step}; lower the learning rate")


@dataclass
class BaselineConfig:
    """A gradient baseline: which method, and the utility-preserving schedule it runs with."""

    method: str = "graddiff"  # one of ga, graddiff, npo
    lr: float = 3e-6  # AdamW learning rate; small, as utility-constrained unlearning runs it
    max_steps: int = 60
    stop_forget_acc: float = 0.3  # stop once full-precision forget accuracy is at or below this
    eval_every: int = 5  # steps between forget-accuracy checks
    retain_weight: float = 1.0  # weight of the retain NLL (graddiff, npo)
    retain_batch_size: int = 10
    npo_beta: float = 0.1
    seed: int = 0  # seeds dropout (the model trains in train mode); the caller's global RNG is left as it was
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.method not in BASELINES:
            raise MansuError(f"unknown baseline {self.method!r}; choose one of {BASELINES}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MansuError(f"lr must be a positive number, got {self.lr}")
        for name in ("max_steps", "eval_every", "retain_batch_size"):
            if getattr(self, name) < 1:
                raise MansuError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.stop_forget_acc <= 1:
            raise MansuError(f"stop_forget_acc must be in [0, 1], got {self.stop_forget_acc}")
        if self.retain_weight < 0 or self.npo_beta <= 0:
            raise MansuError("retain_weight must be >= 0 and npo_beta > 0")


@dataclass
class TrainLog:
    """Per-step losses and the forget accuracy at each check."""

    losses: list[float] = field(default_factory=list)
    forget_acc: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    stopped: bool = False  # by the callback


def run_baseline_(model: torch.nn.Module, tokenizer, forget: Sequence[Item], retain: Sequence[Item],
                  config: BaselineConfig, callback: RoundCallback | None = None) -> TrainLog:
    """Train `model` in place with a gradient baseline; stops early once forget accuracy is low, or when
    `callback`, called at each forget-accuracy check with {round, loss, forget_acc_full}, returns true."""
    forget_batch = encode_items(tokenizer, forget)
    retain_batches = itertools.cycle(list(batches(tokenizer, retain, config.retain_batch_size)))
    objective = "npo" if config.method == "npo" else "ga"
    ref = None
    if objective == "npo":
        with torch.no_grad():
            ref = answer_logprob(model, forget_batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    log = TrainLog()
    model.train()
    try:
        with seeded(config.seed, model):
            for step in tqdm(range(1, config.max_steps + 1), desc=config.method, leave=False,
                             disable=not config.progress):
                loss = forget_loss(model, forget_batch, objective, ref, config.npo_beta)
                if config.method != "ga":
                    loss = loss + config.retain_weight * retain_loss(model, next(retain_batches))
                check_finite(loss, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                log.losses.append(loss.item())
                log.steps = step
                if step % config.eval_every == 0:
                    acc = evaluate(model, tokenizer, forget, progress=False).accuracy
                    log.forget_acc.append((step, acc))
                    log.stopped = callback is not None and bool(
                        callback({"round": step, "loss": log.losses[-1], "forget_acc_full": acc}))
                    if log.stopped or (acc is not None and acc <= config.stop_forget_acc):
                        break
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return log
