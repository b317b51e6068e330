"""Cloze multiple-choice evaluation (lm-evaluation-harness `acc`) and the answer log-likelihood."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import (Batch, Item, continuation, encode, encode_items, length_groups, pad_id, pad_rows, pad_tokens,
                   split_tokens)
from .errors import MansuError
from .models import input_device
from .results import Result


# A CPU forward of the embedded model costs ~3.2 ms per padded token on one thread, ~1.7 ms on two, plus ~55 ms
# whatever the tokens (every weight read once): 17 tokens' worth per thread (`python benchmarks/bench_round.py`,
# its first line; docs/method.md). Grouping rows by length pays only past that.
CPU_FORWARD_TOKENS_PER_THREAD = 16


def answer_logprob(model: torch.nn.Module, batch: Batch, by_length: bool = True) -> torch.Tensor:
    """Summed log-probability (fp32) of each row's answer tokens, shape [B], on the logits' device; differentiable.
    On a CPU, where a forward's cost follows its padded tokens, rows of similar length run as one forward each
    (`length_groups`); `by_length=False` runs the batch as one forward, for hooks that read one forward's
    activations. On an accelerator a short forward costs about its launches: the batch stays one."""
    if by_length and input_device(model).type == "cpu":
        groups = length_groups(batch.attention_mask.sum(1).tolist(),
                               CPU_FORWARD_TOKENS_PER_THREAD * torch.get_num_threads())
        if len(groups) > 1:
            scores = torch.cat([_logprob(model, batch.rows(g)) for g in groups])
            return scores[torch.tensor([i for g in groups for i in g]).argsort().to(scores.device)]
    return _logprob(model, batch)


@functools.cache
def _keeps_logits(model_type: type) -> bool:
    """Whether the model's forward projects only chosen positions onto the vocabulary (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def _logprob(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """`answer_logprob` of a batch in one forward."""
    # Only positions whose logits predict some row's answer token are projected onto the vocabulary: on the
    # embedded model the projection and its log-softmax at every prompt position cost 4% of an evaluation and
    # 15% of a forward + backward on a CPU (`python benchmarks/bench_logits.py`, docs/method.md).
    positions = batch.target_mask.any(0).nonzero().squeeze(1)  # on the host batch: no device sync
    batch = batch.to(input_device(model))
    keep = {"logits_to_keep": positions.to(batch.input_ids.device)} if _keeps_logits(type(model)) else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **keep).logits
    if not keep:
        logits = logits[:, positions.to(logits.device)]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    batch, positions = batch.to(logprobs.device), positions.to(logprobs.device)  # the head may sit elsewhere
    token_lp = logprobs.gather(-1, batch.input_ids[:, positions + 1, None]).squeeze(-1)
    return (token_lp * batch.target_mask[:, positions]).sum(-1)


@dataclass
class ChoiceBatch:
    """Every (prompt, choice) pair of some items in one batch; per item its first row, its number of choices
    (1: an item without choices, its answer alone) and its answer's row among them."""

    batch: Batch
    groups: list[tuple[int, int, int]]


def choice_rows(items: Sequence[Item]) -> tuple[list[str], list[str], list[tuple[int, int, int]]]:
    """Every (prompt, choice) pair of `items` as prompts and answers, and per item its `ChoiceBatch` group."""
    prompts, answers, groups = [], [], []
    for it in items:
        choices = it.choices or (it.answer,)
        groups.append((len(prompts), len(choices), choices.index(it.answer)))
        prompts += [it.prompt] * len(choices)
        answers += list(choices)
    return prompts, answers, groups


def encode_choices(tokenizer, items: Sequence[Item]) -> ChoiceBatch:
    """One `ChoiceBatch` of `items`."""
    prompts, answers, groups = choice_rows(items)
    return ChoiceBatch(encode(tokenizer, prompts, answers), groups)


def fact_logprob(model: torch.nn.Module, batch: Batch | ChoiceBatch) -> torch.Tensor:
    """Per item, differentiable: its answer's log-probability (a `Batch`), or the true choice's log-probability
    among its choices (a `ChoiceBatch`: what the multiple-choice test reads; an item without choices, its
    answer's). The second does not fall when an edit lowers every answer of a kind alike."""
    if isinstance(batch, Batch):
        return answer_logprob(model, batch)
    scores = answer_logprob(model, batch.batch)
    return torch.stack([scores[first + answer] - (torch.logsumexp(scores[first : first + k], 0) if k > 1 else 0)
                        for first, k, answer in batch.groups])


def encode_forget(tokenizer, items: Sequence[Item], forget_on: str) -> Batch | ChoiceBatch:
    """The batch a forget objective reads `fact_logprob` of: `forget_on` "choices" or "answer"."""
    if forget_on not in ("answer", "choices"):
        raise MansuError(f"forget_on must be 'answer' or 'choices', got {forget_on!r}")
    return encode_choices(tokenizer, items) if forget_on == "choices" else encode_items(tokenizer, items)


@dataclass(repr=False)
class EvalResult(Result):
    """Accuracy over items with choices, mean probability of the true choice, mean answer NLL/token."""

    accuracy: float | None
    true_prob: float | None
    answer_nll: float
    n: int
    correct: list[bool] = field(default_factory=list)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "true_prob": self.true_prob, "answer_nll": self.answer_nll, "n": self.n}


@torch.no_grad()
def choice_scores(model: torch.nn.Module, tokenizer, items: Sequence[Item], batch_size: int = 32,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Every (prompt, choice) row's summed answer log-likelihood and answer length (on the CPU), `batch_size` rows a
    forward, with each item's `choice_rows` group; raises on non-finite scores. Rows run in order of prompt length
    (an item's choices side by side), each distinct prompt once where the model takes a cache (`_cache_argument`)."""
    prompts, answers, groups = choice_rows(items)
    rows = [split_tokens(tokenizer, p, continuation(p, a)) for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(rows)), key=lambda r: (rows[r][1], r))
    cache_argument, pad = _cache_argument(type(model)), pad_id(tokenizer)
    scores = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", leave=False, disable=not progress):
            chunk = [rows[r] for r in order[start : start + batch_size]]
            scores.append(answer_logprob(model, pad_rows(chunk, pad)) if cache_argument is None
                          else _shared_prompt_logprob(model, chunk, pad, cache_argument))
    finally:
        model.train(was_training)
    score = torch.empty(len(rows))
    score[torch.tensor(order)] = torch.cat(scores).cpu()  # one transfer, after the loop
    if not torch.isfinite(score).all():
        raise MansuError("the model produced non-finite log-likelihoods (NaN/inf weights?)")
    return score, torch.tensor([len(row) - first for row, first in rows]), groups


@functools.cache
def _cache_argument(model_type: type) -> str | None:
    """The keyword a model's forward takes a KV cache by ("cache" from transformers 5.x, "past_key_values" before),
    or None where it cannot continue rows from a shared prompt's cache (no cache, or no explicit positions)."""
    parameters = inspect.signature(model_type.forward).parameters
    if "position_ids" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _shared_prompt_logprob(model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], pad: int,
                           cache_argument: str) -> torch.Tensor:
    """`answer_logprob` of `split_tokens` rows, each distinct prompt run once: its last position scores every
    row's first answer token, and its cache carries the rows whose answers run longer. A multiple-choice item's k
    choices then cost one prompt, not k: most of an evaluation's tokens are prompt tokens (82-91% on bundled sets;
    `python benchmarks/bench_shared_prompts.py`, docs/method.md)."""
    shared: dict[tuple[int, ...], int] = {}
    owner = torch.tensor([shared.setdefault(tuple(row[:first]), len(shared)) for row, first in rows])
    prompt_ids, prompt_mask = pad_tokens(list(shared), pad)
    lengths = prompt_mask.sum(1)
    device = input_device(model)
    # Only each prompt's last position is projected onto the vocabulary (as in `_logprob`).
    last = torch.unique(lengths - 1)
    keep = {"logits_to_keep": last.to(device)} if _keeps_logits(type(model)) else {}
    out = model(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), use_cache=True, **keep)
    logits = out.logits if keep else out.logits[:, last.to(out.logits.device)]
    at_last = logits[torch.arange(len(shared)), torch.searchsorted(last, lengths - 1).to(logits.device)]
    first_tokens = torch.tensor([row[first] for row, first in rows], device=logits.device)
    scores = torch.log_softmax(at_last.float(), dim=-1)[owner.to(logits.device), first_tokens]
    longer = [b for b, (row, first) in enumerate(rows) if len(row) - first > 1]
    if not longer:
        return scores
    # The rest of each longer answer continues its prompt's cache, one row per answer: positions carry on from
    # the prompt's own length (its padding is masked, not counted).
    cache = getattr(out, cache_argument, None)
    if not hasattr(cache, "reorder_cache"):  # no cache returned, or legacy tuples (remote code): these run whole
        whole = answer_logprob(model, pad_rows([rows[b] for b in longer], pad))
        return scores.index_copy(0, torch.tensor(longer, device=scores.device), whole.to(scores.device))
    rows_prompt = owner[longer]
    cache.reorder_cache(rows_prompt.to(device))
    fed, fed_mask = pad_tokens([rows[b][0][rows[b][1] : -1] for b in longer], pad)
    targets, _ = pad_tokens([rows[b][0][rows[b][1] + 1 :] for b in longer], pad)
    positions = lengths[rows_prompt, None] + torch.arange(fed.shape[1])
    attention_mask = torch.cat([prompt_mask[rows_prompt], fed_mask], dim=1)
    logits = model(input_ids=fed.to(device), attention_mask=attention_mask.to(device),
                   position_ids=positions.to(device), use_cache=False, **{cache_argument: cache}).logits
    token_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(logits.device)[..., None]).squeeze(-1)
    rest = (token_lp * fed_mask.to(token_lp.device)).sum(-1)
    return scores.index_add(0, torch.tensor(longer, device=scores.device), rest)


def evaluate(
    model: torch.nn.Module, tokenizer, items: Sequence[Item], batch_size: int = 32, progress: bool = True
) -> EvalResult:
    """Score every choice by its summed answer log-likelihood; an item is correct if its answer wins."""
    if not items:
        raise MansuError("cannot evaluate an empty item set")
    score, length, groups = choice_scores(model, tokenizer, items, batch_size, progress)

    correct, true_probs, nlls = [], [], []
    for it, (first, k, answer_index) in zip(items, groups):
        item_scores = score[first : first + k]
        nlls.append(-(item_scores[answer_index] / length[first + answer_index]).item())
        if it.choices:
            correct.append(bool(item_scores.argmax() == answer_index))
            true_probs.append(torch.softmax(item_scores, 0)[answer_index].item())
    return EvalResult(
        accuracy=sum(correct) / len(correct) if correct else None,
        true_prob=sum(true_probs) / len(true_probs) if true_probs else None,
        answer_nll=sum(nlls) / len(nlls),
        n=len(items),
        correct=correct,
    )
