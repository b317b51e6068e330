"""Probes of forgetting beyond the exact prompt: paraphrases, free generation, and a relearning attack.

Multiple-choice accuracy on the very prompts an edit trained on can be met by a brittle edit. These probes
ask harder questions: the same facts asked in other words (`Item.paraphrases`); whether greedy decoding
still writes the answer; and whether a few fine-tuning steps on half of the forgotten facts bring back the
other half (a relearning attack: knowledge that was only suppressed comes back fast). Each runs on the
full-precision model and on quantized copies.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Batch, Item, encode_items
from .errors import MansuError
from .evaluation import evaluate
from .models import input_device
from .methods import check_finite, retain_loss, seeded
from .results import Result


def variants(model: nn.Module, formats: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """('full', model), then (fmt, a quantized copy) for each format, each copy freed once the caller moves on."""
    from .quant import quantized_copy

    yield "full", model
    for fmt in formats:
        copy_ = quantized_copy(model, fmt)
        yield fmt, copy_
        del copy_


def paraphrase_items(items: Sequence[Item]) -> list[Item]:
    """Every item asked with each of its paraphrases (empty when no item has any)."""
    return [p for it in items for p in it.paraphrased()]


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8,
                         batch_size: int = 32, progress: bool = False) -> list[str]:
    """Each prompt's greedy continuation, decoded without special tokens."""
    texts, side = [], tokenizer.padding_side
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=not progress):
        tokenizer.padding_side = "left"  # generation continues from the last position: pad on the left
        try:
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        enc = enc.to(input_device(model))
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return texts


def generation_recall(model: nn.Module, tokenizer, items: Sequence[Item], max_new_tokens: int = 8,
                      batch_size: int = 32, progress: bool = True) -> float:
    """Fraction of items whose greedy continuation of the prompt starts with the answer (case and leading
    whitespace ignored): recall without the help of choices."""
    if not items:
        raise MansuError("generation recall needs at least one item")
    texts = greedy_continuations(model, tokenizer, [it.prompt for it in items], max_new_tokens, batch_size, progress)
    return sum(text.strip().lower().startswith(it.answer.strip().lower()) for text, it in zip(texts, items)) / len(items)


@dataclass(frozen=True)
class Knowledge:
    """How much of a fact set a model still knows."""

    score: float  # fraction of items known: multiple-choice accuracy with choices, greedy recall without
    belief: float  # mean probability of the true answer: among the choices, or per answer token without


def knowledge(model: nn.Module, tokenizer, items: Sequence[Item]) -> Knowledge:
    """`Knowledge` of `items`, which may mix items with and without choices (the edit's stopping rule)."""
    parts = []  # (items, score, belief) per kind of item
    with_choices = [it for it in items if it.choices]
    without = [it for it in items if not it.choices]
    if with_choices:
        result = evaluate(model, tokenizer, with_choices, progress=False)
        parts.append((len(with_choices), result.accuracy, result.true_prob))
    if without:
        result = evaluate(model, tokenizer, without, progress=False)
        parts.append((len(without), generation_recall(model, tokenizer, without, progress=False),
                      math.exp(-result.answer_nll)))
    return Knowledge(*(sum(n * part[i] for n, *part in parts) / len(items) for i in (0, 1)))


@dataclass(repr=False)
class RelearnResult(Result):
    """A relearning attack: fine-tune on `n_train` forgotten items, then score the other `n_eval`."""

    steps: int
    lr: float
    n_train: int
    n_eval: int
    before: dict[str, float]  # accuracy on the held-out forgotten items before the attack, per format
    after: dict[str, float]  # ... and after it
    train_nll: tuple[float, float]  # answer NLL of the items trained on, before and after: the attack took

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "n_train": self.n_train, "n_eval": self.n_eval,
                **{f"{k}_before": v for k, v in self.before.items()}, **{f"{k}_after": v for k, v in self.after.items()}}


def fact_groups(items: Sequence[Item]) -> dict[tuple, list[Item]]:
    """`items` grouped by fact: one fact is one answer among the same choices, in however many wordings."""
    facts: dict[tuple, list[Item]] = {}
    for it in items:
        facts.setdefault((it.answer, it.choices), []).append(it)
    return facts


def fact_halves(items: Sequence[Item], seed: int = 0) -> tuple[list[Item], list[Item]]:
    """`items` split at random (under `seed`) into half of their facts and the rest, each fact (items with the
    same answer and choices) whole on one side; with one item per fact, a seeded shuffle of the items."""
    facts = fact_groups(items)
    if len(facts) < 2:
        raise MansuError("a relearning attack needs at least 2 forget facts: half to train on, half to score")
    groups = list(facts.values())
    random.Random(seed).shuffle(groups)
    half = len(groups) // 2
    return [it for g in groups[:half] for it in g], [it for g in groups[half:] for it in g]


def held_accuracies(items: Sequence[Item], held: Sequence[Item], known: Mapping[str, Sequence[bool]],
                    readings: Sequence[str]) -> dict[str, float | None]:
    """Per reading, the accuracy on `held` (some of `items`) read from `known`, each reading's `EvalResult.correct`
    on `items` (one flag per item with choices); None where no held item has choices, as `evaluate` says."""
    missing = [r for r in readings if r not in known]
    if missing:
        raise MansuError(f"`known` has no scores of {missing}; it has {sorted(known)}")
    asked = [it for it in items if it.choices]
    held_ids = {id(it) for it in held}
    out: dict[str, float | None] = {}
    for reading in readings:
        if len(known[reading]) != len(asked):
            raise MansuError(f"`known[{reading!r}]` has {len(known[reading])} flags for {len(asked)} items with choices")
        flags = [flag for it, flag in zip(asked, known[reading]) if id(it) in held_ids]
        out[reading] = sum(flags) / len(flags) if flags else None
    return out


def sign_attacked(model: nn.Module, batch: Batch, eps: float, steps: int = 1) -> nn.Module:
    """A copy of `model` after `steps` signed steps of size `eps` down the answer NLL of `batch` (its gradient read
    again before each), on every parameter: Adam's first updates are about lr * sign(gradient), so this is a cheap
    stand-in for a relearning fine-tune. The steps are taken in each parameter's dtype: in bf16, eps=1e-4 is below
    most weights' rounding step."""
    attacked = copy.deepcopy(model)
    attacked.eval()
    params = list(attacked.parameters())
    try:
        for step in range(1, steps + 1):
            for p in params:
                p.requires_grad_(True)
            loss = retain_loss(attacked, batch)  # the answers' NLL: learning them again
            check_finite(loss, step)
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.sub_(eps * p.grad.sign())
                    p.grad = None
    finally:
        for p in params:
            p.requires_grad_(False)
    return attacked


def relearn_attack(model: nn.Module, tokenizer, forget: Sequence[Item], formats: Sequence[str] = ("nf4",),
                   steps: int = 10, lr: float = 1e-5, seed: int = 0, progress: bool = True,
                   known: Mapping[str, Sequence[bool]] | None = None) -> RelearnResult:
    """Fine-tune a copy of `model` (AdamW, `steps` steps on the answers' NLL) on half of `forget`'s facts, chosen
    under `seed` (which also seeds dropout), and score the other half before and after, in full precision and
    each format. Items with the same answer and choices (one fact in several wordings, as
    `train_on_paraphrases` makes) stay on one side: scoring a wording of a fact the attack trained on would
    count it as relearned. `known`: per reading ('full' and each format), `model`'s `EvalResult.correct` on
    `forget`, when the caller has scored it: the "before" accuracies are read from it, not from quantized copies
    made again. `model` itself, and the caller's global RNG, are left as they were."""
    if steps < 1 or not lr > 0:
        raise MansuError(f"relearning needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    train, held = fact_halves(forget, seed)

    def accuracies(m: nn.Module) -> dict[str, float]:
        return {name: evaluate(q, tokenizer, held, progress=False).accuracy for name, q in variants(m, formats)}

    before = accuracies(model) if known is None else held_accuracies(forget, held, known, ["full", *formats])
    attacked = copy.deepcopy(model)
    batch = encode_items(tokenizer, train)
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=lr, weight_decay=0.0)
    attacked.train()
    losses = []
    with seeded(seed, attacked):
        for step in tqdm(range(1, steps + 1), desc="relearn", leave=False, disable=not progress):
            loss = retain_loss(attacked, batch)  # the answers' NLL: learning them again
            check_finite(loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    attacked.eval()
    with torch.no_grad():
        losses.append(retain_loss(attacked, batch).item())
    after = accuracies(attacked)
    return RelearnResult(steps, lr, len(train), len(held), before, after, (losses[0], losses[-1]))
