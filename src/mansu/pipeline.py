"""`unlearn`: the MANSU pipeline as readable steps, and the one entry point for the baselines too.

0. with `protect` (the default), a bundled general-knowledge set joins the retain set for every step below, and with
   `relation_neighbours`, items asking the forget prompts' relation of subjects the model names (mansu.relation); with
   `forget_variants`, generated rewordings of each forget item (mansu.data.prompt_variants) join step 3's
   forget objective (about one per item each round); attribution and the stopping rule read the items themselves
1. attribute the forget circuit (EAP-IG)            -> only its parameters may move
2. diagonal Fisher and null-space projectors on the retain set
3. rounds (mansu.editor): every candidate weight moves to the neighbouring NF4 level in the projected forget
   descent direction; moves are ranked by forget benefit net of first-order retain harm, per Fisher cost; a
   retain guard (and with `anchor_guard`, an anchor guard) gives back a round (with `backtracks`, its weaker
   half first) that hurts the retain set (the anchor facts); stop once the forget set is forgotten in full
   precision and in the quantized (deployed) model (with `stop_on_gap`, with no PTQ gap), and then in a copy
   in every `exam_formats` format (with `relearn_exam`, also after a small relearning attack: mansu.relearn_exam).
   When progress stalls, the circuit grows: attribution on the edited model
   adds the components that now carry the knowledge
4. quantize-and-check: the permanence certificate against the original weights
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch

from .attribution import Circuit, CircuitConfig, attribute_circuit
from .data import Item, check_disjoint, load_anchor, prompt_variants, warn_if_relation_unkept, with_protection
from .config import check_types, from_dict
from .editor import Editor
from .errors import MansuError
from .fisher import BoundConfig, Fisher, Mask, diagonal_fisher
from .methods import BaselineConfig, RoundCallback, run_baseline_
from .models import require_loaded
from .projection import ProjectionConfig, Projector, null_space_projector
from .relation import self_neighbours
from .quant import Certificate, get_format, quantized_weights
from .results import Result


@dataclass
class MansuConfig:
    """MANSU: circuit-restricted, Fisher-bounded, null-space-projected, NF4-floored unlearning."""

    objective: str = "npo"  # forget objective: "npo" (saturates once an item is forgotten) or "ga"
    forget_variants: tuple[str, ...] = ()  # generated rewordings of each forget item (mansu.data.VARIANTS) the
    # forget objective (a mean of their own, about one per item a round) also reads, so the edit is not tied to one
    # wording; not a default: on the 16 held-out splits ("trim1", "quoted", "fact", seed 0) held-out paraphrases
    # fell (mean 0.36 -> 0.27), but every target was met on 5 runs instead of 7, 3 did not converge, and NF4
    # utility was over the target on 3 instead of 1 (cross-languages-10 lost 0.19) (docs/method.md, 2026-12-06)
    forget_on: str = "choices"  # the log-prob it lowers: the true choice's among the item's "choices" (what the
    # test reads: lowering every answer of a kind alike, as on same-currencies-10, earns nothing), or the "answer"'s
    # own (items without choices always use it)
    circuit: CircuitConfig = field(default_factory=lambda: CircuitConfig(mass=0.3, retain_penalty=1.0, progress=False))
    energy: float | None = 0.99  # retain energy the projector protects; None: no projection
    fisher_budget: float | None = None  # cap on 0.5 sum F delta^2 over all edits (nats/item); None: no cap
    retain_weight: float = 1.0  # weight of a move's first-order retain harm in its score
    retain_guard: float | None = 0.25  # undo a round raising the retain NLL (nats/item) by more; None: no guard
    retain_guard_both_ways: bool = False  # also undo a round *lowering* it by more (cross-capitals-20's retain NLL
    # fell 2.2 nats/item as its untouched sets lost 0.6); off: within a domain forgetting itself lowers it, and
    # same-capitals-10 then stalls (docs/method.md)
    anchor_guard: float | None = None  # also undo a round lowering the `anchor` facts' mean probability of the
    # true choice by more: they guard what neither set names (retain can stay perfect while untouched knowledge
    # falls); None: off
    anchor: str = "general"  # the anchor items: a bundled anchor set (mansu.data.load_anchor) or a JSONL path
    relation_neighbours: int = 0  # the model names subjects of the forget prompts' relation until this many retain
    # items ask it, each labelled with its own best answer (mansu.relation.self_neighbours); they join the retain set
    # as `protect` does. Not a default: on the suite (3 seeds) every target was met on 26 of 48 runs (defaults 22),
    # but cross-capitals-20 stalled with every seed and cross-opposites-20 with one (docs/method.md, "Neighbours
    # labelled with the model's greedy answer"); 0: none
    protect: str | None = "general"  # an anchor set (as `anchor`) that joins the retain set everywhere the edit
    # reads it (attribution's penalty, Fisher, projector, rounds, guard): knowledge the user's retain set does not
    # name. cross-capitals-20, retaining cities and continents, lost 0.30 of its untouched sets without it
    # (docs/method.md, dur17); "general+countries" also keeps 38 facts about countries (measured on part of the
    # suite, not a default: docs/method.md, 2026-12-06); None: the retain set alone
    backtracks: int = 3  # a round past the guard gives back its weaker half up to this many times, then all of it
    stop_on_gap: bool = True  # converged also needs every quantized reading to know no more than full precision
    # (PTQ gap <= 0); False: each at most target_forget_acc
    exam_formats: tuple[str, ...] = ("nf4-dq", "fp4", "int8", "q4_0", "q8_0")  # converged also needs the forget
    # set forgotten in each of these formats (full-model copies, checked once full precision and the twin are done)
    relearn_exam: float | None = None  # converged also needs the forget set to resist a relearning attack
    # (`mansu.probes.sign_attacked`: two signed steps of this size on every parameter, down the answer NLL of half
    # of the forget facts) on the other half, each half in turn: at most `relearn_tolerance` more of it known than
    # before the attack; while it fails, the attacked copy's forget gradient on that half joins; None: off
    relearn_tolerance: float = 0.1
    format: str = "nf4"  # the deployed format every edit must cross a bin of
    floor_mode: str = "snap"  # "snap": onto the neighbouring level; "margin": just inside the next bin
    edits_per_round: int = 5_000  # weights moved per round: the ranking is first-order, and stale after a few
    # thousand bin-crossing moves (cross-languages-10: 20,000 per round overshot and cost 0.37 of utility)
    cost_smoothing: float = 1.0  # score = benefit / (cost + smoothing * median cost): 0 ranks by pure ratio
    max_rounds: int = 40  # a safety cap: the edit stops on convergence, or when it cannot progress
    target_forget_acc: float = 0.1  # stop once forget accuracy is at most this, full AND quantized (below the
    # 0.35 bar, so paraphrases and the other formats have room)
    patience: int = 2  # rounds without progress (belief in the answers down by min_progress; with rewordings,
    # or the NPO forget objective) before growing
    min_progress: float = 0.02  # relative decrease that counts as progress
    grow_mass: float = 0.2  # a stalled circuit's attribution mass grows by this (top_k: doubles); 0: never
    max_growths: int = 3
    floor: bool = True  # ablation switch: False moves weights half way to their bin's edge (never across)
    fisher_cost: bool = True  # ablation switch: False ranks moves without the Fisher cost
    retain_sample: int = 32  # retain items in each round's gradient, and in the guard's fixed sample: 64 met the same
    # targets on ten held-out splits, in more seconds per round (side by side: 21.6 s against 16.2; docs/method.md)
    attribution_retain: int = 16  # retain items whose attribution penalises circuit components
    npo_beta: float = 1.0  # NPO inverse temperature: larger stops pushing forgotten items sooner
    saturate_on: str = "full"  # NPO stops pushing an item once this model forgot it: "quantized" (the twin)
    # or "full" (plain NPO); either way, while an exam format fails, NPO on a copy in that format also pushes
    seed: int = 0  # the retain samples' draws (a local generator: the caller's global RNG is left as it was)
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.objective not in ("ga", "npo"):
            raise MansuError(f"objective must be 'ga' or 'npo', got {self.objective!r}")
        if self.forget_on not in ("answer", "choices"):
            raise MansuError(f"forget_on must be 'answer' or 'choices', got {self.forget_on!r}")
        self.circuit = from_dict(CircuitConfig, self.circuit)
        if self.energy is not None:
            ProjectionConfig(energy=self.energy)  # validates
        if self.fisher_budget is not None:
            BoundConfig(budget=self.fisher_budget)
        fmt = get_format(self.format)
        if not fmt.absmax_scaled:
            raise MansuError(f"the floor needs an absmax-scaled 4-bit format (nf4, fp4, -dq), not {self.format!r}")
        if self.saturate_on not in ("quantized", "full"):
            raise MansuError(f"saturate_on must be 'quantized' or 'full', got {self.saturate_on!r}")
        if self.floor_mode not in ("snap", "margin"):
            raise MansuError(f"floor_mode must be 'snap' or 'margin', got {self.floor_mode!r}")
        for name in ("edits_per_round", "max_rounds", "retain_sample", "attribution_retain", "patience"):
            if getattr(self, name) < 1:
                raise MansuError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.relation_neighbours < 0:
            raise MansuError(f"relation_neighbours must be >= 0, got {self.relation_neighbours}")
        if min(self.retain_weight, self.cost_smoothing, self.grow_mass, self.max_growths) < 0 or self.npo_beta <= 0:
            raise MansuError("retain_weight, cost_smoothing, grow_mass and max_growths must be >= 0, npo_beta > 0")
        if self.retain_guard is not None and self.retain_guard <= 0:
            raise MansuError(f"retain_guard must be > 0 (or None), got {self.retain_guard}")
        if self.anchor_guard is not None:
            if not 0 < self.anchor_guard < 1:
                raise MansuError(f"anchor_guard must be in (0, 1) (or None), got {self.anchor_guard}")
            load_anchor(self.anchor)  # an unknown set fails here, not after attribution
        if self.protect is not None:
            load_anchor(self.protect)
        if self.backtracks < 0:
            raise MansuError(f"backtracks must be >= 0, got {self.backtracks}")
        self.exam_formats = tuple(self.exam_formats)
        self.forget_variants = tuple(self.forget_variants)
        prompt_variants([], self.forget_variants)  # an unknown kind fails here
        for name in self.exam_formats:
            get_format(name)  # an unknown format fails here, not after the edit
        if not 0 <= self.min_progress < 1:
            raise MansuError(f"min_progress must be in [0, 1), got {self.min_progress}")
        if self.relearn_exam is not None and not self.relearn_exam > 0:
            raise MansuError(f"relearn_exam must be > 0 (or None), got {self.relearn_exam}")
        if not 0 <= self.relearn_tolerance < 1:
            raise MansuError(f"relearn_tolerance must be in [0, 1), got {self.relearn_tolerance}")
        if not 0 <= self.target_forget_acc <= 1:
            raise MansuError(f"target_forget_acc must be in [0, 1], got {self.target_forget_acc}")


@dataclass(repr=False)
class UnlearnResult(Result):
    """What `unlearn` did: the circuit, each round, the permanence certificate, and timings."""

    method: str
    converged: bool  # forget target met (MANSU: full precision and quantized; baselines: full precision)
    rounds: list[dict[str, float]]
    edited: int | None  # weights changed (baselines: not tracked, they move nearly every weight)
    total_params: int
    certificate: Certificate | None
    circuit: Circuit | None
    timing_s: dict[str, float]
    config: dict[str, Any]
    stop_reason: str = ""  # converged; or why not: stalled, no useful move left, max_rounds, callback (baselines:
    # max_steps)
    circuit_params: int | None = None  # parameters the edit could move, after any growth
    named_neighbours: list[Item] = field(default_factory=list)  # what `relation_neighbours` added to the retain
    # set: the relation asked of subjects the model named, each labelled with its own best answer

    def summary(self) -> dict[str, Any]:
        out = {"method": self.method, "converged": self.converged, "stop_reason": self.stop_reason,
               "rounds": len(self.rounds),
               "edited_fraction": self.edited / self.total_params if self.edited is not None else None,
               "seconds": sum(self.timing_s.values())}
        if self.certificate is not None:
            out["certified"] = self.certificate.certified
        if self.config.get("relearn_exam") is not None:
            out["relearn_exam"] = self.relearn_exam()
        if self.config.get("relation_neighbours"):
            out["named_neighbours"] = len(self.named_neighbours)
        return out

    def relearn_exam(self) -> str:
        """How the relearning exam ended: passed, dropped (nothing was left to try for it), not taken (one forget
        fact: no half to attack with), or not reached (the run did not converge)."""
        if any(r.get("relearn_exam_dropped") for r in self.rounds):
            return "dropped"
        if not self.converged:
            return "not reached"
        return "passed" if "relearn_recovery" in self.rounds[-1] else "not taken"


def unlearn(model: torch.nn.Module, tokenizer, forget: Sequence[Item], retain: Sequence[Item],
            config: MansuConfig | BaselineConfig | None = None, callback: RoundCallback | None = None
            ) -> UnlearnResult:
    """Make `model` (edited in place) forget `forget` while keeping `retain`; MANSU by default. `callback` is
    called with each round's record (a baseline's: each forget-accuracy check); a true return stops the run.
    Warns (`MansuWarning`) when no retain prompt asks the forget prompts' relation of another subject."""
    config = config or MansuConfig()
    if not forget or not retain:
        raise MansuError("unlearning needs a non-empty forget set and a non-empty retain set")
    check_disjoint(forget=forget, retain=retain)
    if not (isinstance(config, MansuConfig) and config.relation_neighbours):
        warn_if_relation_unkept(forget, retain)
    if isinstance(config, BaselineConfig):
        return _baseline(model, tokenizer, forget, retain, config, callback)
    if not isinstance(config, MansuConfig):
        raise MansuError(f"config must be a MansuConfig or BaselineConfig, got {type(config).__name__}")
    timing: dict[str, float] = {}
    tick = time.perf_counter()
    layout = quantized_weights(model)
    require_loaded(model, layout)  # the quantized twin and the edit need every quantized weight in memory

    retain = with_protection(retain, forget, config.protect)
    named = self_neighbours(model, tokenizer, forget, retain, config.relation_neighbours, config.seed,
                            progress=config.progress)
    retain += named
    if config.relation_neighbours:  # naming is timed apart from attribution: seconds on a CPU
        timing["neighbours"], tick = time.perf_counter() - tick, time.perf_counter()
    variants = prompt_variants(forget, config.forget_variants, avoid=retain)

    # The retain attribution only penalises components: a sample of the retain set is enough for it.
    sample = random.Random(config.seed).sample(list(retain), min(config.attribution_retain, len(retain)))
    # Attribution (here and at each growth) reads the forget items alone, not their rewordings: with them it took
    # 5x as long on cross-opposites-20 (12.5 -> 61.8 s), and the circuit they chose was not what cost utility
    # (dur31, docs/method.md)
    circuit = attribute_circuit(model, tokenizer, forget, sample, config.circuit)
    mask = {n: m for n, m in circuit.mask(model).items() if m.any() and n in layout}
    if not mask:
        raise MansuError("the circuit selected no quantized weight to edit; raise circuit.mass or top_k")
    timing["attribution"], tick = time.perf_counter() - tick, time.perf_counter()

    fisher, projector = _retain_statistics(model, tokenizer, retain, mask, config)
    timing["fisher_projection"], tick = time.perf_counter() - tick, time.perf_counter()

    editor = Editor(model, mask, layout, fisher, projector, config)
    timing["edit_setup"], tick = time.perf_counter() - tick, time.perf_counter()
    growths = 0

    def grow(editor: Editor) -> bool:
        """Widen the circuit with what attribution on the edited model finds; False when it cannot."""
        nonlocal growths
        wider = _wider(config.circuit, growths + 1, config.grow_mass)
        if growths >= config.max_growths or wider is None:
            return False
        growths += 1
        found = attribute_circuit(model, tokenizer, forget, sample, wider).mask(model)
        grown = union_masks(editor.mask, {n: m for n, m in found.items() if n in layout})
        if sum(int(m.sum()) for m in grown.values()) == editor.circuit_params():
            return False
        editor.extend(grown, *_retain_statistics(model, tokenizer, retain, grown, config))
        return True

    rounds, converged, reason = editor.run(tokenizer, forget, retain, grow if config.grow_mass > 0 else None,
                                           callback, variants)
    timing["edit"], tick = time.perf_counter() - tick, time.perf_counter()

    certificate = editor.certify()
    timing["check"] = time.perf_counter() - tick
    return UnlearnResult("mansu", converged, rounds, editor.edited_count(), editor.total_params(), certificate,
                         circuit, timing, _config_dict(config), reason, editor.circuit_params(), named)


def _retain_statistics(model, tokenizer, retain: Sequence[Item], mask, config: MansuConfig
                       ) -> tuple[Fisher, Projector | None]:
    """The diagonal Fisher and (unless switched off) the null-space projector of `mask` on the retain set."""
    fisher = diagonal_fisher(model, tokenizer, retain, mask, progress=config.progress)
    projector = (null_space_projector(model, tokenizer, retain, mask, ProjectionConfig(config.energy),
                                      progress=config.progress) if config.energy is not None else None)
    return fisher, projector


def union_masks(kept: Mask, added: Mask) -> Mask:
    """Every entry either mask selects, per tensor; a tensor only `kept` names stays (a wider attribution may
    drop a component the narrower one had, but the edit keeps every weight it may already have moved)."""
    out = dict(kept)
    for name, m in added.items():
        out[name] = out[name] | m if name in out else m
    return {n: m for n, m in out.items() if m.any()}


def _wider(circuit: CircuitConfig, growth: int, step: float) -> CircuitConfig | None:
    """The circuit config of the `growth`-th growth: mass + growth * step (top_k * 2^growth); None past all."""
    if circuit.top_k is not None:
        return replace(circuit, top_k=circuit.top_k * 2 ** growth)
    mass = min(1.0, circuit.mass + growth * step)
    return replace(circuit, mass=mass) if mass > circuit.mass + (growth - 1) * step else None


def _baseline(model, tokenizer, forget, retain, config: BaselineConfig, callback: RoundCallback | None
              ) -> UnlearnResult:
    """A gradient baseline through the same entry point and result type (no circuit, no certificate)."""
    tick = time.perf_counter()
    log = run_baseline_(model, tokenizer, forget, retain, config, callback)
    seconds = time.perf_counter() - tick
    checks = dict(log.forget_acc)
    rounds = [{"round": s, "loss": loss} | ({"forget_acc_full": checks[s]} if s in checks else {})
              for s, loss in enumerate(log.losses, 1)]
    converged = bool(log.forget_acc) and log.forget_acc[-1][1] <= config.stop_forget_acc
    return UnlearnResult(config.method, converged, rounds, None, sum(p.numel() for p in model.parameters()),
                         None, None, {"edit": seconds}, _config_dict(config),
                         "converged" if converged else "callback" if log.stopped else "max_steps")


def _config_dict(config: MansuConfig | BaselineConfig) -> dict[str, Any]:
    return {"type": type(config).__name__, **asdict(config)}
