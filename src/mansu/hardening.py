"""`harden`: make another method's unlearning survive quantization, with the permanence certificate.

An unlearned model from elsewhere (GradDiff, NPO, a LoRA merge, a user's own loop) differs from its original
by far less than an NF4 bin: NF4 rounds the edit away and the deployed model remembers. `harden` reads that
edit as a guide to *where* and *which way* the forgetting lives, and redoes it in moves NF4 keeps:
1. the guide: `after - before` per quantized weight; only the `top_fraction` of weights with the largest
   |guide| / NF4 bin width may move (memory follows that set, not the model);
2. every quantized weight goes back to its original value, so each final change is one of step 3's moves
   and the certificate holds against the original (the weights NF4 leaves in full precision keep the edit);
3. MANSU's edit loop (`mansu.editor.Editor`) on that set, each weight moving to the neighbouring level in the
   guide's direction, ranked by forget benefit net of retain harm per Fisher cost, under the retain guard,
   until the forget set is forgotten in full precision, on the quantized twin and in the exam formats; when
   it stalls, the set doubles (the guide's top 2x, 4x, ... `top_fraction`, `growths` times);
4. the certificate: every changed weight flips its code, nothing else does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from .config import check_types, from_dict
from .data import Item, check_disjoint, prompt_variants, with_protection
from .editor import Editor
from .errors import MansuError
from .fisher import Mask, diagonal_fisher
from .models import require_loaded
from .pipeline import MansuConfig, UnlearnResult, _config_dict
from .quant import bin_geometry, quantized_layout, quantized_weights

RANKINGS = ("bins", "magnitude")
DIRECTIONS = ("guide", "descent")


@dataclass
class HardenConfig:
    """Which of the guide's weights may move, and the edit loop's settings (circuit and projection unused)."""

    top_fraction: float = 0.005  # fraction of the quantized weights the edit may move: the guide's largest
    rank_by: str = "bins"  # "bins": |guide| / NF4 bin width (how far the guide went); "magnitude": |guide|
    growths: int = 3  # a stalled edit's set doubles, at most this many times (the top 2x, 4x, ... fraction)
    direction: str = "guide"  # each weight's move: "guide" (the other method's sign) or "descent" (the forget
    # objective's descent on the model being hardened): the guide then says where, not which way
    # 10,000 moves a round, not unlearn's 5,000: on the demo split GradDiff's hardening stalled at 0.40 / 0.60
    # (full / NF4) with 5,000; with 20,000 an NPO Trainer run lost 0.06 of NF4 utility, with 10,000 0.02
    # (docs/harden.md)
    # No protection set and unlearn's former retain sample by default: issue #12's four paths were measured so
    # (docs/harden.md)
    edit: MansuConfig = field(default_factory=lambda: MansuConfig(edits_per_round=10_000, progress=False,
                                                                  protect=None, retain_sample=64))

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.top_fraction <= 1:
            raise MansuError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.growths < 0:
            raise MansuError(f"growths must be >= 0, got {self.growths}")
        if self.direction not in DIRECTIONS:
            raise MansuError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.rank_by not in RANKINGS:
            raise MansuError(f"rank_by must be one of {RANKINGS}, got {self.rank_by!r}")
        self.edit = from_dict(MansuConfig, self.edit)


def original_weights(original: Any, layout: Mapping[str, bool]) -> dict[str, torch.Tensor]:
    """The quantized weights of `original` (a model or a state dict), by name; refuses one that lacks any."""
    state = original.state_dict() if isinstance(original, torch.nn.Module) else original
    if not isinstance(state, Mapping):
        raise MansuError(f"original must be a model or a state dict, got {type(original).__name__}")
    missing = [n for n in layout if n not in state]
    if missing:
        raise MansuError(f"the original lacks {len(missing)} quantized weight(s), e.g. {missing[0]!r}")
    return {n: state[n] for n in layout}


def _scores(after: torch.Tensor, before: torch.Tensor, transposed: bool, config: HardenConfig) -> torch.Tensor:
    """How strongly the guide moved each weight (0 where it did not), in the weight's stored layout."""
    guide = (after.detach().float() - before.to(after.device).float()).abs()
    if config.rank_by == "magnitude":
        return guide
    width = bin_geometry(quantized_layout(before.to(after.device), transposed), config.edit.format).width
    width = quantized_layout(width, transposed)
    # A block of zeros has no bins (its scale is 0): nothing there can move.
    return torch.where(width > 0, guide / width.clamp(min=1e-30), torch.zeros_like(guide))


def guide_mask(model: torch.nn.Module, before: Mapping[str, torch.Tensor], layout: Mapping[str, bool],
               config: HardenConfig) -> tuple[Mask, dict[str, torch.Tensor]]:
    """The weights the edit may move (the guide's top `top_fraction`) and the guide's sign on them (flat)."""
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in layout)
    k = max(1, int(config.top_fraction * total))
    # Pass 1, one tensor at a time: the k-th largest score over all of them (a running top-k of size k).
    best = torch.empty(0)
    for name, transposed in layout.items():
        s = _scores(params[name], before[name], transposed, config).reshape(-1)
        best = torch.cat([best, s.topk(min(k, s.numel())).values.cpu()])
        best = best.topk(min(k, len(best))).values
    threshold = float(best[-1]) if len(best) else 0.0
    mask, sign = {}, {}
    for name, transposed in layout.items():  # pass 2: the weights at or above it that the guide moved
        s = _scores(params[name], before[name], transposed, config)
        m = (s >= threshold) & (s > 0)
        if m.any():
            delta = params[name].detach()[m].float() - before[name].to(m.device)[m].float()
            mask[name], sign[name] = m, delta.sign()
    if not mask:
        raise MansuError("the model does not differ from the original in any quantized weight: nothing to harden")
    return mask, sign


def harden(model: torch.nn.Module, original: Any, tokenizer, forget: Sequence[Item], retain: Sequence[Item],
           config: HardenConfig | None = None) -> UnlearnResult:
    """Make the unlearned `model` (edited in place) keep its forgetting in NF4, against `original` (a model
    or its state dict; only the quantized weights are read)."""
    config = config or HardenConfig()
    if not isinstance(config, HardenConfig):
        raise MansuError(f"config must be a HardenConfig, got {type(config).__name__}")
    if not forget or not retain:
        raise MansuError("hardening needs a non-empty forget set and a non-empty retain set")
    check_disjoint(forget=forget, retain=retain)
    edit = config.edit  # its seed draws the rounds' retain samples (a local generator: the global RNG is left alone)
    retain = with_protection(retain, forget, edit.protect)
    variants = prompt_variants(forget, edit.forget_variants, avoid=retain)
    timing: dict[str, float] = {}
    tick = time.perf_counter()

    layout = quantized_weights(model)
    require_loaded(model, layout)
    before = original_weights(original, layout)
    # The sets of every growth, found before the weights go back to the original (the guide is their difference).
    fractions = [min(1.0, config.top_fraction * 2 ** g) for g in range(config.growths + 1)]
    levels = [guide_mask(model, before, layout, replace(config, top_fraction=f))
              for f in sorted(set(fractions))]
    mask, guide = levels.pop(0)
    params = dict(model.named_parameters())
    with torch.no_grad():  # back to the original: every change that remains is a move of the loop below
        for name in layout:
            params[name].copy_(before[name])
    timing["guide"], tick = time.perf_counter() - tick, time.perf_counter()

    # The direction is given, so no projector: the ranking's retain-harm term and the guard protect retain.
    fisher = diagonal_fisher(model, tokenizer, retain, mask, progress=edit.progress)
    editor = Editor(model, mask, layout, fisher, None, edit, guide if config.direction == "guide" else None)
    timing["fisher"], tick = time.perf_counter() - tick, time.perf_counter()

    def grow(editor: Editor) -> bool:
        """The next growth's set (a superset: each weight already moved stays in it); False past the last."""
        if not levels:
            return False
        wider, wider_guide = levels.pop(0)
        editor.extend(wider, diagonal_fisher(model, tokenizer, retain, wider, progress=edit.progress), None)
        if config.direction == "guide":
            editor.set_guide(wider_guide)
        return True

    rounds, converged, reason = editor.run(tokenizer, forget, retain, grow, variants=variants)
    if not converged:
        reached = fractions[-1] if config.growths else config.top_fraction
        reason += (f": the guide's top {reached:g} of weights did not reach forget accuracy "
                   f"{edit.target_forget_acc} in full precision and {', '.join((edit.format, *edit.exam_formats))}; "
                   f"raise top_fraction")
    timing["edit"], tick = time.perf_counter() - tick, time.perf_counter()
    certificate = editor.certify()
    timing["check"] = time.perf_counter() - tick
    return UnlearnResult("harden", converged, rounds, editor.edited_count(), editor.total_params(), certificate,
                         None, timing, _config_dict(config), reason, editor.circuit_params())
