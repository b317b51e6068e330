"""CAD, circuit attribution divergence: did an edit change the forget circuit, or only the output?

CAD = (1 - cos(s, s')) / 2, where s holds the EAP-IG forget scores of the circuit's components on the
original model (stored in the `Circuit`) and s' the same components' scores on the edited model,
with the circuit's steps and baseline. Range [0, 1]: 0 for an unchanged model (same profile), 0.5 for
an unrelated profile (or an all-zero one), 1 for a reversed one. Cosine, not a distance, because an
output-only suppression rescales every attribution at once (the answer's probability, and so the
gradient of its log-likelihood, changes), while it leaves the profile, i.e. which components carry the
answer and in what proportion, as it was; an erasure changes the profile.

Use circuits attributed with 5 or more steps: at 2 the output push alone reads 0.13-0.42.
The threshold separating "structural" erasure from "behavioral" suppression comes from measurements
on the embedded model (docs/attribution.md): unchanged 0; output head pushed away from the answers
by up to 15 nats of answer log-likelihood 0.004-0.04; circuit weights noised or zeroed 0.37-0.58.
`THRESHOLD` sits between. An extreme output push (~50 nats) reaches 0.25: see the doc's limits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .attribution import Circuit, attribute, mean_activations, scores_of
from .data import Item
from .errors import MansuError
from .results import Result

THRESHOLD = 0.1


def divergence(original: torch.Tensor, edited: torch.Tensor) -> float:
    """(1 - cosine similarity) / 2 of two score vectors, in [0, 1]; an all-zero vector counts as orthogonal."""
    if original.shape != edited.shape or original.numel() == 0:
        raise MansuError(f"CAD needs two score vectors of one non-empty shape, got {original.shape}, {edited.shape}")
    norms = original.double().norm() * edited.double().norm()
    cos = (original.double() @ edited.double() / norms).item() if norms > 0 else 0.0
    return min(1.0, max(0.0, (1.0 - cos) / 2))


@dataclass(repr=False)
class CADResult(Result):
    """CAD of an edited model against its circuit, with the threshold and the verdict it gives."""

    value: float
    threshold: float
    verdict: str  # "structural" (value >= threshold) or "behavioral"
    components: int
    original_scores: list[float]
    edited_scores: list[float]


def cad(
    model: nn.Module,
    tokenizer,
    circuit: Circuit,
    forget: Sequence[Item],
    retain: Sequence[Item] | None = None,
    threshold: float = THRESHOLD,
    progress: bool = True,
) -> CADResult:
    """CAD of `model` (the edited one) on `forget` over `circuit`'s components, scored as the circuit was."""
    config = circuit.config
    if config.baseline == "mean" and retain is None:
        raise MansuError("the circuit used the 'mean' baseline: give the retain set to recompute it")
    baseline = mean_activations(model, tokenizer, retain, config.batch_size) if config.baseline == "mean" else None
    scores = attribute(model, tokenizer, forget, config.steps, baseline, config.batch_size, progress)
    edited = scores_of(scores, circuit.components)
    value = divergence(torch.tensor(circuit.forget_scores), edited)
    return CADResult(value, threshold, "structural" if value >= threshold else "behavioral",
                     len(circuit.components), circuit.forget_scores, edited.tolist())
