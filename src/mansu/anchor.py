"""The anchor guard's reading: facts neither the forget nor the retain set names, watched while the edit runs."""
from __future__ import annotations

from typing import Sequence

import torch

from .data import Item
from .errors import MansuError
from .evaluation import evaluate


class Anchor:
    """Facts neither set names, watched as a multiple-choice test: how far the mean probability of the true
    choice (over the item's choices) fell from the unedited model's, in each of `models` (the editor's: full
    precision and its quantized twin, edited in place as the rounds go). The answers' own NLL is no measure here:
    a harmless edit can lower the model's confidence in every answer alike (cross-animal_young-10: +0.59 nats with
    no untouched set losing an item, docs/method.md)."""

    def __init__(self, models: Sequence[torch.nn.Module], tokenizer, items: Sequence[Item]):
        if any(it.choices is None for it in items):
            raise MansuError("every anchor item needs choices: the anchor guard reads the true choice's probability")
        self.models, self.tokenizer, self.items = tuple(models), tokenizer, items
        self.before = self.read()

    def read(self) -> tuple[float, ...]:
        """Mean probability of the true choice in each model."""
        return tuple(evaluate(m, self.tokenizer, self.items, progress=False).true_prob for m in self.models)

    def drop(self) -> tuple[float, ...]:
        """How far each reading fell since the edit began (negative: it rose)."""
        return tuple(before - after for before, after in zip(self.before, self.read()))
