"""`unlearn`: the MANSU pipeline as readable steps, and the one entry point for the baselines too.

1. attribute the forget circuit (EAP-IG)            -> only its parameters may move
2. diagonal Fisher and null-space projectors on the retain set
3. rounds: gradient of the forget objective (+ retain NLL), projected off the retain inputs; every
   candidate weight's move is floored to the neighbouring NF4 level in that direction; the moves with
   the best forget benefit per Fisher cost are taken, within the Fisher budget; stop once the forget
   set is forgotten both in full precision and in the quantized (deployed) model
4. quantize-and-check: the permanence certificate against the original weights
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .attribution import Circuit, CircuitConfig, attribute_circuit
from .data import Item, check_disjoint, encode_items
from .config import check_types, from_dict
from .errors import MansuError
from .evaluate import answer_logprob, evaluate
from .fisher import BoundConfig, Fisher, bound_update, diagonal_fisher, masked_grad_hooks
from .floor import floor_update
from .methods import BaselineConfig, check_finite, forget_loss, retain_loss, run_baseline_
from .models import require_loaded
from .projection import ProjectionConfig, Projector, null_space_projector
from .quant import Certificate, check, fake_quantize, get_format, quantized_copy, quantized_layout, quantized_weights
from .results import Result


@dataclass
class MansuConfig:
    """MANSU: circuit-restricted, Fisher-bounded, null-space-projected, NF4-floored unlearning."""

    objective: str = "npo"  # forget objective: "npo" (saturates once an item is forgotten) or "ga"
    circuit: CircuitConfig = field(default_factory=lambda: CircuitConfig(mass=0.3, retain_penalty=1.0, progress=False))
    energy: float | None = 0.99  # retain energy the projector protects; None: no projection
    fisher_budget: float | None = None  # cap on 0.5 sum F delta^2 over all edits (nats/item); None: no cap
    retain_weight: float = 1.0  # weight of the retain NLL in the gradient that picks the moves
    format: str = "nf4"  # the deployed format every edit must cross a bin of
    floor_mode: str = "snap"  # "snap": onto the neighbouring level; "margin": just inside the next bin
    edits_per_round: int = 20_000  # weights moved per round
    cost_smoothing: float = 1.0  # score = benefit / (cost + smoothing * median cost): 0 ranks by pure ratio
    max_rounds: int = 15
    target_forget_acc: float = 0.3  # stop once forget accuracy is at most this, full AND quantized
    retain_sample: int = 64  # retain items in each round's gradient
    attribution_retain: int = 16  # retain items whose attribution penalises circuit components
    npo_beta: float = 1.0  # NPO inverse temperature: larger stops pushing forgotten items sooner
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.objective not in ("ga", "npo"):
            raise MansuError(f"objective must be 'ga' or 'npo', got {self.objective!r}")
        self.circuit = from_dict(CircuitConfig, self.circuit)
        if self.energy is not None:
            ProjectionConfig(energy=self.energy)  # validates
        if self.fisher_budget is not None:
            BoundConfig(budget=self.fisher_budget)
        fmt = get_format(self.format)
        if not fmt.absmax_scaled:
            raise MansuError(f"the floor needs an absmax-scaled 4-bit format (nf4, fp4, -dq), not {self.format!r}")
        if self.floor_mode not in ("snap", "margin"):
            raise MansuError(f"floor_mode must be 'snap' or 'margin', got {self.floor_mode!r}")
        for name in ("edits_per_round", "max_rounds", "retain_sample", "attribution_retain"):
            if getattr(self, name) < 1:
                raise MansuError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retain_weight < 0 or self.cost_smoothing < 0 or self.npo_beta <= 0:
            raise MansuError("retain_weight and cost_smoothing must be >= 0, npo_beta > 0")
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

    def summary(self) -> dict[str, Any]:
        out = {"method": self.method, "converged": self.converged, "rounds": len(self.rounds),
               "edited_fraction": self.edited / self.total_params if self.edited is not None else None,
               "seconds": sum(self.timing_s.values())}
        if self.certificate is not None:
            out["certified"] = self.certificate.certified
        return out


def unlearn(model: torch.nn.Module, tokenizer, forget: Sequence[Item], retain: Sequence[Item],
            config: MansuConfig | BaselineConfig | None = None) -> UnlearnResult:
    """Make `model` (edited in place) forget `forget` while keeping `retain`; MANSU by default."""
    config = config or MansuConfig()
    if not forget or not retain:
        raise MansuError("unlearning needs a non-empty forget set and a non-empty retain set")
    check_disjoint(forget=forget, retain=retain)
    if isinstance(config, BaselineConfig):
        return _baseline(model, tokenizer, forget, retain, config)
    if not isinstance(config, MansuConfig):
        raise MansuError(f"config must be a MansuConfig or BaselineConfig, got {type(config).__name__}")
    torch.manual_seed(config.seed)
    timing: dict[str, float] = {}
    tick = time.perf_counter()

    layout = quantized_weights(model)
    require_loaded(model, layout)  # the quantized twin and the edit need every quantized weight in memory

    # The retain attribution only penalises components: a sample of the retain set is enough for it.
    sample = random.Random(config.seed).sample(list(retain), min(config.attribution_retain, len(retain)))
    circuit = attribute_circuit(model, tokenizer, forget, sample, config.circuit)
    mask = {n: m for n, m in circuit.mask(model).items() if m.any() and n in layout}
    if not mask:
        raise MansuError("the circuit selected no quantized weight to edit; raise circuit.mass or top_k")
    timing["attribution"], tick = time.perf_counter() - tick, time.perf_counter()

    fisher = diagonal_fisher(model, tokenizer, retain, mask, progress=config.progress)
    projector = (null_space_projector(model, tokenizer, retain, mask, ProjectionConfig(config.energy),
                                      progress=config.progress) if config.energy is not None else None)
    timing["fisher_projection"], tick = time.perf_counter() - tick, time.perf_counter()

    editor = _Editor(model, mask, {n: layout[n] for n in mask}, fisher, projector, config)
    rounds, converged = editor.run(tokenizer, forget, retain)
    timing["edit"], tick = time.perf_counter() - tick, time.perf_counter()

    certificate = editor.certify()
    timing["check"] = time.perf_counter() - tick
    return UnlearnResult("mansu", converged, rounds, editor.edited_count(), editor.total_params(), certificate,
                         circuit, timing, _config_dict(config))


class _Editor:
    """The round loop's state. Per circuit weight tensor everything is kept as flat vectors over its mask's
    entries (in mask order, as the Fisher keeps them), so memory follows the circuit, not the model; every
    such vector, and the quantized twin, lives on its parameter's device."""

    def __init__(self, model, mask, transposed: dict[str, bool], fisher: Fisher, projector: Projector | None,
                 config: MansuConfig):
        self.model, self.mask, self.fisher, self.projector, self.config = model, mask, fisher, projector, config
        self.params = dict(model.named_parameters())
        self.transposed = transposed  # per circuit weight: stored [in, out] (Conv1D), as the quantizer sees it
        self.original = {n: self.params[n].detach()[m].clone() for n, m in mask.items()}
        self.moved = {n: torch.zeros_like(v, dtype=torch.bool) for n, v in self.original.items()}
        # Each weight moves at most once and no block's absmax ever moves, so where every unmoved weight lands
        # on its neighbouring level, up or down, is fixed: computed once, here, in the parameter's dtype. A move
        # writes that value itself: w + delta rounds in bf16 and could miss it.
        self.up = {n: self.floored_target(n, +1) for n in mask}
        self.down = {n: self.floored_target(n, -1) for n in mask}
        self.spent = 0.0  # Fisher cost of the edits so far
        # The deployed model, kept in step with the edit: only the blocks an edit touches are re-quantized.
        self.quantized = quantized_copy(model, config.format)
        self.quantized_params = dict(self.quantized.named_parameters())

    def floored_target(self, name: str, sign: int) -> torch.Tensor:
        """Where every masked weight of `name` goes on a move to the neighbouring level above (+1) or below (-1);
        its own value where it cannot move (a block's absmax, the outermost level)."""
        w, m, t = self.params[name].detach(), self.mask[name], self.transposed[name]
        nudged = torch.where(m, torch.nextafter(w, torch.full_like(w, sign * math.inf)), w)
        floored = floor_update(quantized_layout(w, t), quantized_layout(nudged, t), self.config.format,
                               mode=self.config.floor_mode)
        return quantized_layout(floored, t)[m]

    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def edited_count(self) -> int:
        return sum(int((self.params[n].detach()[m] != self.original[n]).sum()) for n, m in self.mask.items())

    def original_weights(self) -> dict[str, torch.Tensor]:
        """The circuit tensors as they were before the edit (for the certificate)."""
        out = {}
        for n, m in self.mask.items():
            out[n] = self.params[n].detach().clone()
            out[n][m] = self.original[n]
        return out

    def run(self, tokenizer, forget: Sequence[Item], retain: Sequence[Item]) -> tuple[list[dict], bool]:
        cfg, rng = self.config, random.Random(self.config.seed)
        forget_batch = encode_items(tokenizer, forget)
        ref = None
        if cfg.objective == "npo":
            with torch.no_grad():
                ref = answer_logprob(self.model, forget_batch)
        rounds, converged = [], False
        bar = tqdm(range(1, cfg.max_rounds + 1), desc="mansu", leave=False, disable=not cfg.progress)
        for step in bar:
            sample = rng.sample(list(retain), min(cfg.retain_sample, len(retain)))
            retain_batch = encode_items(tokenizer, sample)
            grads, directions, losses = self.gradient(forget_batch, retain_batch, ref, step)
            moves = self.propose(grads, directions)
            if not moves:
                break
            self.apply(moves)
            full = evaluate(self.model, tokenizer, forget, progress=False)
            quant = evaluate(self.quantized, tokenizer, forget, progress=False)
            rounds.append({"round": step, **losses, "edited": self.edited_count(), "fisher_cost": self.spent,
                           "forget_acc_full": full.accuracy, f"forget_acc_{cfg.format}": quant.accuracy,
                           "forget_true_prob_full": full.true_prob, f"forget_true_prob_{cfg.format}": quant.true_prob})
            bar.set_postfix(full=full.accuracy, quant=quant.accuracy, edited=rounds[-1]["edited"])
            if full.accuracy <= cfg.target_forget_acc and quant.accuracy <= cfg.target_forget_acc:
                converged = True
                break
        return rounds, converged

    def gradient(self, forget_batch, retain_batch, ref, step: int) -> tuple[dict, dict, dict]:
        """Per circuit tensor, the flat gradient of forget objective + retain_weight * retain NLL, and the
        (projected) descent direction; each full-size gradient is freed as soon as backward writes it."""
        grads, directions = {}, {}

        def take(name: str, grad: torch.Tensor) -> None:
            m = self.mask[name]
            step_dir = -grad.float() * m  # fp32: neither the projection nor the scores round to bf16
            if self.projector is not None:
                step_dir = self.projector.apply({name: step_dir})[name]
            grads[name], directions[name] = grad[m].float(), step_dir[m].float()

        flags = {n: p.requires_grad for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.requires_grad_(n in self.mask)  # backward skips the weight gradients of everything else
            with masked_grad_hooks({n: self.params[n] for n in self.mask}, take):
                f_loss = forget_loss(self.model, forget_batch, self.config.objective, ref, self.config.npo_beta)
                r_loss = retain_loss(self.model, retain_batch)
                loss = f_loss + self.config.retain_weight * r_loss
                check_finite(loss, step)
                loss.backward()
        finally:
            for n, p in self.params.items():
                p.requires_grad_(flags[n])
        return grads, directions, {"forget_loss": f_loss.item(), "retain_nll": r_loss.item()}

    @torch.no_grad()
    def propose(self, grads: dict[str, torch.Tensor], directions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flat fp32 moves of the best-scoring unmoved circuit weights, within the Fisher budget."""
        cfg, names = self.config, list(self.mask)
        deltas = {n: self.candidates(n, directions[n]) for n in names}
        here = deltas[names[0]].device  # the ranking is global: every candidate's score meets on one device
        benefit = torch.cat([-(grads[n] * deltas[n]).to(here) for n in names])  # first-order decrease of the objective
        cost = torch.cat([self.fisher.entry_cost(n, deltas[n]).to(here) for n in names])  # the retain bound's terms
        useful = benefit > 0
        if not useful.any():
            return {}
        smoothing = cfg.cost_smoothing * cost[useful].median()
        score = torch.where(useful, benefit / (cost + smoothing + 1e-30), torch.zeros_like(benefit))
        keep = torch.zeros_like(useful)
        keep[score.topk(min(cfg.edits_per_round, int(useful.sum()))).indices] = True
        kept = keep.split([len(deltas[n]) for n in names])
        moves = {n: deltas[n] * k.to(deltas[n].device) for n, k in zip(names, kept)}
        if cfg.fisher_budget is not None:
            remaining = cfg.fisher_budget - self.spent
            if remaining <= 0:
                return {}
            full = {n: self.dense(n, d) for n, d in moves.items() if d.any()}
            bounded = bound_update(self.fisher, full, BoundConfig(remaining, "prune")).update
            moves = {n: d[self.mask[n]] for n, d in bounded.items()}
        return {n: d for n, d in moves.items() if d.any()}

    def candidates(self, name: str, direction: torch.Tensor) -> torch.Tensor:
        """Each masked weight's move (fp32) to its floored target in `direction`; 0 if moved already or no direction."""
        target = torch.where(direction > 0, self.up[name], self.down[name])
        movable = (direction != 0) & ~self.moved[name]
        return (target.float() - self.original[name].float()) * movable

    def dense(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """A flat vector over `name`'s mask as a full-shape tensor of its dtype (zero elsewhere)."""
        out = torch.zeros(self.mask[name].shape, dtype=flat.dtype, device=flat.device)
        out[self.mask[name]] = flat
        return out

    @torch.no_grad()
    def apply(self, moves: dict[str, torch.Tensor]) -> None:
        """Set each moved weight to its floored target, exactly, in the model and in its quantized twin."""
        for n, delta in moves.items():
            self.spent += float(self.fisher.entry_cost(n, delta).sum())
            chosen = delta != 0
            target = torch.where(delta > 0, self.up[n], self.down[n])
            m, p = self.mask[n], self.params[n]
            p[m] = torch.where(chosen, target, p[m])
            self.moved[n] |= chosen
            self.requantize(n, self.dense(n, chosen))

    def requantize(self, name: str, moved: torch.Tensor) -> None:
        """Refresh the quantized twin where `name` moved: only the touched blocks, when they are contiguous."""
        p, q, t = self.params[name].detach(), self.quantized_params[name].data, self.transposed[name]
        size = get_format(self.config.format).blocksize
        if t or p.numel() % size:  # a transposed (Conv1D) or ragged weight: re-quantize all of it
            q.copy_(quantized_layout(fake_quantize(quantized_layout(p, t), self.config.format), t))
            return
        blocks, touched = p.reshape(-1, size), moved.reshape(-1, size).any(1)
        q.view(-1, size)[touched] = fake_quantize(blocks[touched], self.config.format)

    def certify(self) -> Certificate:
        """Free the quantized twin (the rounds are over), then check the edit against the original weights."""
        del self.quantized, self.quantized_params
        edited = {n: self.params[n].detach() for n in self.mask}
        return check(self.original_weights(), edited, self.config.format, self.transposed)


def _baseline(model, tokenizer, forget, retain, config: BaselineConfig) -> UnlearnResult:
    """A gradient baseline through the same entry point and result type (no circuit, no certificate)."""
    tick = time.perf_counter()
    log = run_baseline_(model, tokenizer, forget, retain, config, progress=True)
    seconds = time.perf_counter() - tick
    checks = dict(log.forget_acc)
    rounds = [{"round": s, "loss": loss} | ({"forget_acc_full": checks[s]} if s in checks else {})
              for s, loss in enumerate(log.losses, 1)]
    converged = bool(log.forget_acc) and log.forget_acc[-1][1] <= config.stop_forget_acc
    return UnlearnResult(config.method, converged, rounds, None, sum(p.numel() for p in model.parameters()),
                         None, None, {"edit": seconds}, _config_dict(config))


def _config_dict(config: MansuConfig | BaselineConfig) -> dict[str, Any]:
    return {"type": type(config).__name__, **asdict(config)}
