"""The relearning exam of MANSU's stopping rule (`MansuConfig.relearn_exam`): would a small fine-tune on half of
the forgotten facts bring back the other half?

The attack is `mansu.probes.sign_attacked`, a few signed steps on every parameter down the answers' NLL (Adam's
first updates are about lr * sign(gradient)); each half of the forget facts attacks in turn while the other is
scored. A failing attack is kept: the edit's next rounds push its scored half on a copy so attacked.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .data import Batch, Item, encode_items
from .errors import MansuWarning
from .probes import fact_groups, fact_halves, knowledge, sign_attacked

# Signed steps of the exam's attack. After MANSU on cross-opposites-20 (seed 0), 10 AdamW steps at lr 1e-5 on half
# of the facts brought back 0.7 of the other half; one step of 1e-4 brought back 0.1-0.2 (each half attacking),
# two 0.6-0.8; on cross-languages-10 one step brought back 0.6 against AdamW's 0.8, on cross-animal_young-10 neither
# any (docs/method.md, 2026-12-07).
RELEARN_STEPS = 2


class RelearnExam:
    """The forget facts' two halves, each as (the attacking half's batch, the scored half, the scored half's forget
    objective chunks), and the attack that last brought back too much (`failed`)."""

    def __init__(self, model: nn.Module, tokenizer, forget: Sequence[Item], eps: float, tolerance: float, seed: int,
                 chunks: Callable[[Sequence[Item], torch.Tensor | None], list], refs: torch.Tensor | None):
        """`chunks(items, refs)`: the edit's forget objective over `items` (Editor.chunks); `refs`: (NPO) each forget
        item's log-prob before the edit, in `forget`'s order."""
        self.eps, self.tolerance = eps, tolerance
        # Halves of the run's own drawing, not fact_halves(forget, 0), the benchmark's attack: the exam must not know
        # which facts an attacker trains on.
        first, second = fact_halves(forget, random.Random(seed).getrandbits(32))
        at = {id(it): i for i, it in enumerate(forget)}  # fact_halves hands back the items themselves

        def objective(items: list[Item]) -> list:
            return chunks(items, None if refs is None else refs[[at[id(it)] for it in items]])

        self.halves = [(encode_items(tokenizer, a), b, objective(b)) for a, b in ((first, second), (second, first))]
        self.failed: tuple[Batch, list] | None = None
        low = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
        if low:  # a step below a weight's rounding step leaves it where it was: say so, do not pass silently
            warnings.warn(f"relearn_exam's steps of {eps} are taken in the model's {sorted(map(str, low))}, whose "
                          "rounding step is larger for most weights: the exam attacks with less than that",
                          MansuWarning)

    @staticmethod
    def possible(forget: Sequence[Item]) -> bool:
        """An exam needs two facts: one half to attack with, one to score."""
        return len(fact_groups(forget)) > 1

    def attacked(self, model: nn.Module, batch: Batch) -> nn.Module:
        return sign_attacked(model, batch, self.eps, RELEARN_STEPS)

    def passes(self, model: nn.Module, tokenizer, record: dict[str, Any]) -> bool:
        """Each half's attack brings back at most `tolerance` of the other half (the largest recovery, and the
        scored half's belief after that attack, recorded); the worse attack is kept as `failed` when it does not."""
        worst = None
        for batch, held, objective in self.halves:
            attacked = self.attacked(model, batch)
            after = knowledge(attacked, tokenizer, held)
            del attacked
            recovery = after.score - knowledge(model, tokenizer, held).score
            if worst is None or recovery > worst[0]:
                worst = (recovery, after.belief, batch, objective)
        recovery, belief, batch, objective = worst
        record["relearn_recovery"], record["relearn_belief"] = recovery, belief
        self.failed = (batch, objective) if recovery > self.tolerance + 1e-9 else None  # float slack: item ratios
        return self.failed is None
