"""Neighbours the model names itself: other subjects of the forget prompts' relation, asked with the model's own
answer, to join the retain set.

Forgetting "The capital of France is Paris" also cost the relation's other facts (docs/method.md, "What the utility
sets did not see"): the forget objective lowers the true choice by raising the wrong ones, for every subject. Facts
of the same relation in the retain set keep it (25-43 of them kept 0.90 of the rest), but a user who forgets ten
capitals rarely lists fifty others. So the model lists them: shown a few of the forget set's subjects ("A list of
similar things: France, Iran, Ghana,") it names another, and the relation asked of that subject, scored over the
forget set's answers and choices and the model's own greedy answer, gives an item labelled with what the model
believes now. Only as many are named as the retain set lacks: a same-domain retain set asks the relation already.
"""
from __future__ import annotations

import random
import re
import warnings
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import Item, relation_template, relation_text, subject_of
from .errors import MansuError, MansuWarning
from .evaluation import choice_scores
from .models import input_device
from .probes import greedy_continuations

LIST_PROMPT = "A list of similar things: "
POOL_ROWS = 256  # (prompt, answer) rows scored in one forward when labelling a named subject
_FILLER = r"(?:and|or|where|etc|also|like|such as|among others)"
_LEADING_FILLER = re.compile(rf"^(?:{_FILLER}\s+)+", re.IGNORECASE)
_ONLY_FILLER = re.compile(rf"^{_FILLER}$", re.IGNORECASE)
_SUBJECT = re.compile(r"^[^\W\d_][\w' .-]*$")  # a name: starts with a letter, no digits, no odd symbols
_ANSWER_END = re.compile(r"[,;:!?\n\"]|\.(?:\s|$)")  # where a greedy answer's first clause ends ("D.C." goes on)


def subjects_of(forget: Sequence[Item]) -> tuple[tuple[str, str], list[str]] | None:
    """The forget prompts' relation template and each prompt's subject (the words between); None without one."""
    template = relation_template([it.prompt for it in forget])
    if template is None:
        return None
    return template, [subject_of(p, template) for p in dict.fromkeys(it.prompt.strip() for it in forget)]


def name_subjects(model: torch.nn.Module, tokenizer, shown: Sequence[str], n: int, seed: int = 0,
                  attempts_per_subject: int = 4, progress: bool = False) -> list[str]:
    """Up to `n` new subjects the model adds to lists of `shown` ones (sampled, seeded); each a short name no
    list had, case aside."""
    if not shown:
        raise MansuError("naming neighbours needs at least one subject to show the model")
    rng, generator = random.Random(seed), torch.Generator(device="cpu").manual_seed(seed)
    seen, found = {s.lower() for s in shown}, []
    device = input_device(model)
    # every accelerator the model sits on (device_map="auto" samples on the last one), all of one kind
    accelerators = sorted({p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")}, key=str)
    kind = accelerators[0].type if accelerators else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=n, desc="naming neighbours", disable=not progress, leave=False)
    try:
        for _ in range(n * attempts_per_subject):
            if len(found) >= n:
                break
            pool = [*shown, *found]
            text = LIST_PROMPT + ", ".join(rng.sample(pool, min(5, len(pool)))) + ","
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            # `generate` samples from the global RNG: seed it from ours inside a fork, so the caller's is kept
            with torch.no_grad(), torch.random.fork_rng(devices=accelerators, device_type=kind):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                out = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=10,
                                     pad_token_id=pad)
            name = _first_name(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            if name and name.lower() not in seen:
                seen.add(name.lower())
                found.append(name)
                bar.update()
    finally:
        bar.close()
    return found


def _first_name(continuation: str) -> str | None:
    """The first list entry of a continuation, without a leading "and"; None when it is not a short name."""
    entry = _LEADING_FILLER.sub("", continuation.split(",")[0].split("\n")[0].strip().rstrip("."))
    short_name = entry and len(entry.split()) <= 3 and _SUBJECT.match(entry) and not _ONLY_FILLER.match(entry)
    return entry if short_name else None


def _answer_phrase(continuation: str) -> str | None:
    """A greedy continuation's first clause when it is a short answer (at most 4 words), else None."""
    phrase = _ANSWER_END.split(continuation, maxsplit=1)[0].strip()
    return phrase if phrase and len(phrase.split()) <= 4 else None


def answer_pool(forget: Sequence[Item]) -> tuple[str, ...]:
    """Every answer and choice of the forget set, once each: what a named subject's label is chosen among (with the
    model's greedy answer)."""
    return tuple(dict.fromkeys(c for it in forget for c in (it.choices or (it.answer,))))


@torch.no_grad()
def self_neighbours(model: torch.nn.Module, tokenizer, forget: Sequence[Item], avoid: Sequence[Item], n: int,
                    seed: int = 0, n_choices: int = 4, progress: bool = False) -> list[Item]:
    """Items asking the forget prompts' relation of subjects the model names, enough that `n` items of `avoid`
    and these ask it, none of them a prompt of `forget` or `avoid`; each labelled with the model's best answer
    among every answer and choice of the forget set and its own greedy answer, its choices the `n_choices` best.
    Empty when the forget prompts share no relation template."""
    if n == 0:
        return []
    found = subjects_of(forget)
    if found is None:
        warnings.warn("relation_neighbours: the forget prompts share no relation template (words every prompt "
                      "starts and ends with around its subject), so no neighbours were named and the retain set is "
                      "as given", MansuWarning, stacklevel=3)
        return []
    template, shown = found
    mates = [s for it in avoid if (s := subject_of(it.prompt, template))]
    if len(mates) >= n:  # the retain set asks the relation often enough already
        return []
    pool = answer_pool(forget)
    taken = {it.prompt.strip() for it in [*forget, *avoid]}
    # with fewer than two answers to label with, naming (dozens of sampled generations) would be work thrown away
    prompts = [p for s in name_subjects(model, tokenizer, [*shown, *mates], n - len(mates), seed, progress=progress)
               if (p := " ".join(filter(None, (template[0], s, template[1])))) not in taken] if len(pool) > 1 else []
    if not prompts:
        warnings.warn(f"relation_neighbours: the model named no new subject of the relation "
                      f"{relation_text(template)!r} (or the forget set has fewer than two answers to label one "
                      "with), so the retain set is as given", MansuWarning, stacklevel=3)
        return []
    # The forget set's answers alone mislabel a subject whose answer is not among them ("The capital of Germany
    # is" -> Paris, a forgotten answer the retain side would then defend): the model's greedy answer joins them
    phrases = [_answer_phrase(text) for text in greedy_continuations(model, tokenizer, prompts, progress=progress)]
    items, known = [], {c.lower() for c in pool}
    for prompt, phrase in zip(prompts, phrases):
        candidates = pool + ((phrase,) if phrase and phrase.lower() not in known else ())
        # one prompt's candidates at a time, POOL_ROWS rows a forward: a large forget set's pool is thousands of rows
        scores, _, _ = choice_scores(model, tokenizer, [Item(prompt, candidates[0], candidates)], POOL_ROWS)
        best = scores.argsort(descending=True)[:n_choices].tolist()
        items.append(Item(prompt, candidates[best[0]], tuple(candidates[i] for i in best)))
    return items
