"""MANSU's edit loop: rounds of floored, projected, Fisher-priced moves inside the forget circuit.

Each round:
1. gradients of the forget objective and of the retain NLL, separately, on the circuit's weights only (NPO by
   default, whose per-item push fades once an item is forgotten, read in full precision, or on the twin with
   `saturate_on="quantized"`; `forget_on="choices"` lowers the true choice's probability among the item's
   choices, not the answer's own). Once an exam format failed, the same objective on a fresh copy in that format
   adds its gradient (straight through the rounding): what that format still knows is pushed there, and fades
   there once it forgot; so does the twin's own, once full precision is forgotten and the twin is not;
2. every unmoved circuit weight's candidate move: to the neighbouring quantization level in the direction
   of the projected forget descent (so it crosses a bin by construction);
3. score = (forget benefit - retain_weight * retain harm) / (Fisher cost + smoothing): first-order forget
   benefit, minus first-order retain *harm* (a move that would also lower the retain NLL earns nothing for it:
   retain gains are never bought), per unit of the second-order retain cost; the best are taken;
4. guards: if the round raised the retain NLL (full precision or quantized) past `retain_guard` over the
   original (with `retain_guard_both_ways`, or lowered it that far), or (with `anchor_guard`) lowered the true
   choice's probability on anchor facts neither set names by more than that, its weaker half of moves is given
   back (up to `backtracks` times), then all of it, and later rounds take half as many moves; weights given
   back are never tried again;
5. the forget set is scored in full precision and on the quantized twin; once both are forgotten (with
   `stop_on_gap`, the twin also knowing no more than full precision), the same is checked on a copy in every
   `exam_formats` format; all pass: done.
Memory follows the circuit: per circuit tensor every vector is flat over its mask's entries, in mask order
(as the Fisher keeps them), on the parameter's device.
"""
from __future__ import annotations

import functools
import math
import random
import time
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .anchor import Anchor
from .data import Batch, Item, encode_items, load_anchor
from .errors import MansuError
from .evaluation import ChoiceBatch, answer_logprob, encode_forget, fact_logprob
from .fisher import BoundConfig, Fisher, Mask, bound_update, flat_index, masked_grad_hooks
from .floor import floor_targets
from .layer_grads import layer_grads, sites
from .methods import RoundCallback, check_finite, forget_loss, retain_loss
from .probes import Knowledge, knowledge
from .projection import Projector
from .relearn_exam import RelearnExam
from .quant import (Certificate, bin_geometry, block_absmax, block_scales, check, codes_at_scale, get_format,
                    keeps_tail, quantized_copy, quantized_layout, to_blocks)

Flat = dict[str, torch.Tensor]  # per circuit tensor, a vector over its mask's entries
# Some forget items' batch, (NPO) their reference log-probs, and their share of the objective
Chunk = tuple[Batch | ChoiceBatch, torch.Tensor | None, float]
# Forget items per forward and backward, so memory follows this, not the forget set: with four variants and four
# choices, 20 items are 400 rows (one pass of cross-capitals-20 took 12 GB and was killed on a 24 GB machine).
FORGET_CHUNK = 16


class Editor:
    """The edit's state: the circuit (which may grow), each weight's original value and floored targets, the
    Fisher and projector, and the quantized twin of the model, kept in step with every move."""

    def __init__(self, model: torch.nn.Module, mask: Mask, layout: dict[str, bool], fisher: Fisher,
                 projector: Projector | None, config: Any, guide: dict[str, torch.Tensor] | None = None):
        self.model, self.config = model, config
        self.params = dict(model.named_parameters())
        self.layout = layout  # every quantized weight -> stored transposed (Conv1D); the circuit may grow into any
        self.fmt = get_format(config.format)
        self.mask: Mask = {}
        self.index: Flat = {}  # each mask's entries as flat indices (`flat_index`), for the gradient hooks
        self.original: Flat = {}
        self.moved: Flat = {}  # moved once, or frozen by the guard: never a candidate again
        self.up: Flat = {}
        self.down: Flat = {}
        self.scales: Flat = {}  # per circuit tensor, each block's decoding scale (the twin's, fixed)
        self.extend(mask, fisher, projector)
        # A given move direction per circuit weight (`mansu.harden`: another method's update), used instead of
        # the projected forget descent; the forget gradient still ranks the moves. Flat, or dense and flattened.
        self.guide: Flat | None = None
        if guide is not None:
            self.set_guide(guide)
        self.spent = 0.0  # Fisher cost of the edits kept so far
        self.exam_format: str | None = None  # the failing reading whose gradient joins: the last exam's format,
        # or the deployed format (the twin) once full precision alone forgot; until the next exam
        self.edits_per_round = config.edits_per_round
        self.relearn: RelearnExam | None = None  # with `relearn_exam` (and two forget facts), set by `run`
        # The deployed model, kept in step with the edit: only the blocks an edit touches are re-quantized.
        self.quantized = quantized_copy(model, config.format)
        self.quantized_params = dict(self.quantized.named_parameters())

    # ------------------------------------------------------------------ the circuit's state

    def extend(self, mask: Mask, fisher: Fisher, projector: Projector | None) -> None:
        """Take `mask` (a superset of the current one) as the circuit, carrying over what moved; the Fisher
        and projector must cover it."""
        for name, m in mask.items():
            old = self.mask.get(name)
            w = self.params[name].detach()
            if old is None:
                original, moved = w[m].clone(), torch.zeros(int(m.sum()), dtype=torch.bool, device=w.device)
            else:
                original = w.clone()
                original[old] = self.original[name]
                original, moved = original[m], self.dense(name, self.moved[name])[m]
            self.mask[name], self.original[name], self.moved[name] = m, original, moved
            self.index[name] = flat_index(m)
            if name not in self.scales:  # the twin's block scales, from the original weights
                absmax = block_absmax(quantized_layout(w, self.layout[name]), self.fmt)
                self.scales[name] = block_scales(self.fmt, absmax)
            # No block's absmax ever moves, so where an unmoved weight lands on a move up or down is fixed:
            # computed once, in the parameter's dtype. A move writes that value itself (w + delta rounds in bf16).
            self.up[name], self.down[name] = self.targets(name)
        self.sites = sites(self.model, self.index)  # where the rounds read the circuit's gradients, in any copy
        for name, layer in (projector.layers.items() if projector is not None else ()):
            if name in mask and not torch.equal(layer.columns.to(self.sites[name].cols.device), self.sites[name].cols):
                raise MansuError(f"the projector of {name!r} was built for other columns than the circuit's")
        self.fisher, self.projector = fisher, projector

    def set_guide(self, guide: dict[str, torch.Tensor]) -> None:
        """Take `guide` (per circuit tensor: flat over its mask, or dense) as every weight's move direction."""
        self.guide = {n: (g[self.mask[n].to(g.device)] if g.shape == self.mask[n].shape else g)
                      .float().to(self.mask[n].device) for n, g in guide.items()}

    def targets(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Where every masked weight of `name` goes on a move up, and on a move down: the neighbouring level
        (floored), or without the floor (an ablation) half way to the bin's edge, never crossing it; its own
        value where it cannot move (a block's absmax, the outermost level)."""
        w, m, t = self.params[name].detach(), self.mask[name], self.layout[name]
        wq, mq = quantized_layout(w, t), quantized_layout(m, t)
        if self.config.floor:  # computed on the masked weights alone, in mask order of the quantizer's layout
            dense, out = wq.clone(), []  # a dense copy only to put them in the parameter's mask order
            for values in floor_targets(wq, mq, self.fmt, mode=self.config.floor_mode):
                dense[mq] = values
                out.append(quantized_layout(dense, t)[m])
            return out[0], out[1]
        # As the floor does, a block's absmax never moves: its scale, and so every other code, stays.
        geometry = bin_geometry(wq, self.fmt)
        blocks = to_blocks(wq, self.fmt)[0].abs()
        peak = (blocks == blocks.amax(1, keepdim=True)).reshape(-1)[: wq.numel()].reshape(wq.shape)
        return tuple(quantized_layout(torch.where(peak, wq, (wq.float() + half).to(w.dtype)), t)[m]
                     for half in (0.5 * geometry.up, -0.5 * geometry.down))

    def dense(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """A flat vector over `name`'s mask as a full-shape tensor (zero elsewhere)."""
        out = torch.zeros(self.mask[name].shape, dtype=flat.dtype, device=flat.device)
        out[self.mask[name]] = flat
        return out

    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def edited_count(self) -> int:
        return sum(int((self.params[n].detach()[m] != self.original[n]).sum()) for n, m in self.mask.items())

    def circuit_params(self) -> int:
        return sum(int(m.sum()) for m in self.mask.values())

    # ------------------------------------------------------------------ one round

    def gradients(self, forget: Sequence[Chunk], retain_batch: Batch, step: int
                  ) -> tuple[Flat, Flat, Flat, dict[str, float]]:
        """Flat forget and retain gradients of the circuit's weights (separate backward passes: the two must not
        mix), the projected forget descent direction, and the losses. `forget`: the forget objective's chunks
        (see `Editor.chunks`), each a batch, (NPO) its items' reference log-probs and its share of the objective."""
        cfg = self.config

        def forget_objective(model: torch.nn.Module, batch, ref: torch.Tensor | None, share: float) -> torch.Tensor:
            if cfg.objective != "npo" or cfg.saturate_on == "full" or model is not self.model:
                return share * forget_loss(model, batch, cfg.objective, ref, cfg.npo_beta)
            # NPO's gradient, 2 sigmoid(beta (logp - ref)) dlogp, with its fading read on the quantized twin.
            logprob = fact_logprob(self.model, batch)
            with torch.no_grad():
                deployed = fact_logprob(self.quantized, batch)
                weight = torch.sigmoid(cfg.npo_beta * (deployed - ref.to(deployed.device)))
            return share * 2.0 * (weight.to(logprob.device) * logprob).mean()

        def passes(model: torch.nn.Module) -> list[Callable[[], torch.Tensor]]:
            return [functools.partial(forget_objective, model, *chunk) for chunk in forget]

        forget_grads, retain_grads, exam_grads, losses = {}, {}, {}, {}
        if self.exam_format is not None:
            # The failing format's own gradient, read on a copy of the model as it is now (the twin, for the deployed
            # format), straight through its rounding: pushing full precision alone let it sink to -22 nats while fp4
            # kept 0.3 of the forget set (cross-capitals-20); NPO on the copy also stops pushing an item once that
            # format forgot it.
            relearning = self.exam_format == RELEARN
            exam = (self.quantized if self.exam_format == cfg.format else
                    self.relearn.attacked(self.model, self.relearn.failed[0]) if relearning else
                    quantized_copy(self.model, self.exam_format))
            # After a relearning attack, only the half it did not train on is pushed: the attack's own half, relearned
            # head-on, is not what the attack is scored on, and pushing it too cost cross-languages-10 0.14 of utility
            exam_passes = ([functools.partial(forget_objective, exam, *chunk) for chunk in self.relearn.failed[1]]
                           if relearning else passes(exam))
            losses["forget_loss_exam"] = self._backward(exam_passes, exam_grads, step, exam)
            del exam
        losses["forget_loss"] = self._backward(passes(self.model), forget_grads, step)
        losses["retain_nll"] = self._backward([lambda: retain_loss(self.model, retain_batch)], retain_grads, step)
        for name, g in exam_grads.items():
            forget_grads[name] += g
        return forget_grads, retain_grads, {n: self.direction(n, g) for n, g in forget_grads.items()}, losses

    def direction(self, name: str, forget_grad: torch.Tensor) -> torch.Tensor:
        """`name`'s flat move direction: the guide's, or the forget descent (projected, with a projector)."""
        if self.guide is not None:  # the direction is given: nothing to project
            return self.guide[name]
        layer = self.projector.layers.get(name) if self.projector is not None else None
        if layer is None:
            return -forget_grad
        # Projected on the circuit's rows x columns block alone (its columns are the projector's S, checked in
        # `extend`), not on the whole weight: a head's rows are a ninth of q_proj's.
        site = self.sites[name]
        block = torch.zeros(len(site.rows) * len(site.cols), dtype=forget_grad.dtype, device=forget_grad.device)
        block[site.where] = -forget_grad
        return layer.project(block.view(len(site.rows), -1)).reshape(-1)[site.where]

    def _backward(self, losses: Sequence[Callable[[], torch.Tensor]], into: Flat, step: int,
                  model: torch.nn.Module | None = None) -> float:
        """Backward of each of `losses` in turn (one chunk's graph in memory at a time), summing the gradients of
        the circuit's weights (of `model`: the edited one by default) flat (fp32) into `into`; their summed value.
        Linear/Conv1D weights read theirs from layer hooks over their circuit block (`mansu.layer_grads`); any
        other circuit parameter takes autograd's, read at its entries; no other parameter takes a gradient."""
        model = self.model if model is None else model
        params = dict(model.named_parameters())
        others = {n: params[n] for n in self.mask if n not in self.sites}
        flags = {n: p.requires_grad for n, p in params.items()}

        def take(name: str, entries: torch.Tensor) -> None:
            flat = entries.float()  # fp32: neither the projection nor the scores round to bf16
            into[name] = into[name] + flat if name in into else flat

        total = 0.0
        try:
            for n, p in params.items():
                p.requires_grad_(n in others)  # backward skips every weight gradient but these
            with layer_grads(model, self.sites, take, per_item=False), masked_grad_hooks(others, self.index, take):
                for loss_fn in losses:
                    loss = loss_fn()
                    check_finite(loss, step)
                    loss.backward()
                    total += loss.item()
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])
        return total

    @torch.no_grad()
    def propose(self, forget_grads: Flat, retain_grads: Flat, directions: Flat) -> Flat:
        """Flat fp32 moves of the best-scoring candidates (see the module docstring), within the Fisher budget."""
        cfg, names = self.config, list(self.mask)
        deltas = {n: self.candidates(n, directions[n]) for n in names}
        here = deltas[names[0]].device  # the ranking is global: every candidate's score meets on one device
        benefit = torch.cat([-(forget_grads[n] * deltas[n]).to(here) for n in names])
        harm = torch.cat([(retain_grads[n] * deltas[n]).clamp(min=0).to(here) for n in names])
        net = benefit - cfg.retain_weight * harm
        useful = net > 0
        if not useful.any():
            return {}
        if cfg.fisher_cost:
            cost = torch.cat([self.fisher.entry_cost(n, deltas[n]).to(here) for n in names])
            net = net / (cost + cfg.cost_smoothing * cost[useful].median() + 1e-30)
        score = torch.where(useful, net, torch.zeros_like(net))
        keep = torch.zeros_like(useful)
        keep[score.topk(min(self.edits_per_round, int(useful.sum()))).indices] = True
        kept = keep.split([len(deltas[n]) for n in names])
        moves = {n: deltas[n] * k.to(deltas[n].device) for n, k in zip(names, kept)}
        # each chosen move's score, so a round that breaches a guard can give back its weaker moves first
        self.scores = {n: sc.to(deltas[n].device) * k.to(deltas[n].device)
                       for n, sc, k in zip(names, score.split([len(deltas[n]) for n in names]), kept)}
        if cfg.fisher_budget is not None:
            remaining = cfg.fisher_budget - self.spent
            if remaining <= 0:
                return {}
            full = {n: self.dense(n, d) for n, d in moves.items() if d.any()}
            bounded = bound_update(self.fisher, full, BoundConfig(remaining, "prune")).update
            moves = {n: d[self.mask[n]] for n, d in bounded.items()}
        return {n: d for n, d in moves.items() if d.any()}

    def candidates(self, name: str, direction: torch.Tensor) -> torch.Tensor:
        """Each masked weight's move (fp32) to its target in `direction`; 0 if moved already or no direction."""
        target = torch.where(direction > 0, self.up[name], self.down[name])
        movable = (direction != 0) & ~self.moved[name]
        return (target.float() - self.original[name].float()) * movable

    @torch.no_grad()
    def apply(self, moves: Flat) -> None:
        """Set each moved weight to its target, exactly, in the model and in its quantized twin."""
        for n, delta in moves.items():
            self.spent += float(self.fisher.entry_cost(n, delta).sum())
            chosen = delta != 0
            target = torch.where(delta > 0, self.up[n], self.down[n])
            self._write(n, torch.where(chosen, target, self.params[n].detach()[self.mask[n]]), chosen)
            self.moved[n] |= chosen

    @torch.no_grad()
    def undo(self, moves: Flat) -> None:
        """Put the weights `moves` moved back; they stay marked as moved, so they are never tried again."""
        for n, delta in moves.items():
            self.spent -= float(self.fisher.entry_cost(n, delta).sum())
            chosen = delta != 0
            self._write(n, torch.where(chosen, self.original[n], self.params[n].detach()[self.mask[n]]), chosen)

    def weaker_half(self, moves: Flat) -> Flat:
        """The lower-scored half of `moves` (the last proposal's scores)."""
        chosen = torch.cat([self.scores[n][d != 0].float().cpu() for n, d in moves.items()])
        cut = chosen.median()
        return {n: d * ((self.scores[n] <= cut) & (d != 0)) for n, d in moves.items()}

    def _write(self, name: str, values: torch.Tensor, chosen: torch.Tensor) -> None:
        self.params[name].detach()[self.mask[name]] = values
        self.requantize(name, self.dense(name, chosen))

    def requantize(self, name: str, moved: torch.Tensor) -> None:
        """Re-encode the twin's blocks of `name` that `moved` touches. No block's absmax ever moves, so each
        block keeps the scale it had (double-quantized over the whole tensor, where the format is)."""
        t = self.layout[name]
        twin = quantized_layout(self.quantized_params[name].data, t)
        blocks, tail = to_blocks(quantized_layout(self.params[name].detach(), t), self.fmt)
        rows = to_blocks(quantized_layout(moved, t), self.fmt, None)[0].any(1).nonzero()[:, 0]
        b = blocks[rows]
        codes = codes_at_scale(self.fmt, b, b.abs().amax(1), keeps_tail(rows, len(blocks), tail))
        values = self.fmt.levels_tensor(b.device)[codes] * self.scales[name][rows, None]
        index = rows[:, None] * self.fmt.blocksize + torch.arange(self.fmt.blocksize, device=rows.device)
        inside = index < twin.numel()  # not the tail's padding
        flat = twin.reshape(-1)  # a view, except for a transposed (Conv1D) weight: then a copy, written back
        flat[index[inside]] = values[inside].to(flat.dtype)
        if flat.data_ptr() != twin.data_ptr():
            twin.copy_(flat.view(twin.shape))

    # ------------------------------------------------------------------ the loop

    def run(self, tokenizer, forget: Sequence[Item], retain: Sequence[Item],
            grow: Callable[["Editor"], bool] | None = None, callback: RoundCallback | None = None,
            variants: Sequence[Item] = ()) -> tuple[list[dict[str, Any]], bool, str]:
        """Rounds until the forget set is forgotten in full precision, on the twin and in the exam formats (the
        rounds, converged, and why it stopped). `variants` (rewordings of the forget items) join the forget
        objective with a mean of their own (`chunks`), about one per item each round (`in_turn`), until a stall
        that no growth is left for; not the stopping rule: it reads the items asked for. On a
        stall, `grow(editor)` may extend the circuit; False when it cannot. `callback(record)` sees each round; a
        true return stops the run."""
        cfg = self.config
        rng = random.Random(cfg.seed)
        guard_items = rng.sample(list(retain), min(cfg.retain_sample, len(retain)))
        guard_batch = encode_items(tokenizer, guard_items)
        forget_chunks = self.chunks(tokenizer, forget)
        variant_refs = self.references(tokenizer, variants)
        with torch.no_grad():
            guard_ref = self.nll(guard_batch)
        # (NPO) the exam's halves keep each item's log-prob before the edit, read once with the forget chunks
        self.relearn = (RelearnExam(self.model, tokenizer, forget, cfg.relearn_exam, cfg.relearn_tolerance, cfg.seed,
                                    functools.partial(self.chunks, tokenizer),
                                    chunk_references(forget_chunks) if cfg.objective == "npo" else None)
                        if cfg.relearn_exam is not None and RelearnExam.possible(forget) else None)
        anchor = (Anchor((self.model, self.quantized), tokenizer, load_anchor(cfg.anchor, forget))
                  if cfg.anchor_guard is not None else None)
        rounds: list[dict[str, Any]] = []
        best, best_loss, since_best, relearning = math.inf, math.inf, 0, False
        bar = tqdm(range(1, cfg.max_rounds + 1), desc="mansu", leave=False, disable=not cfg.progress)
        for step in bar:
            tick = time.perf_counter()
            retain_batch = encode_items(tokenizer, rng.sample(list(retain), min(cfg.retain_sample, len(retain))))
            chunks = forget_chunks
            if variants:
                picked = in_turn(len(variants), len(forget), step)
                chunks = chunks + self.chunks(tokenizer, [variants[i] for i in picked],
                                              None if variant_refs is None else variant_refs[picked])
            forget_grads, retain_grads, directions, losses = self.gradients(chunks, retain_batch, step)
            moves = self.propose(forget_grads, retain_grads, directions)
            record: dict[str, Any] = {"round": step, **losses, "circuit_params": self.circuit_params(),
                                      "moves": _count(moves)}
            if moves:
                self.apply(moves)
                breached = self.guarded(guard_batch, guard_ref, anchor, record)
                # Past the guard: give back the weaker half of the round's moves, up to `backtracks` times; then all
                # of it, and later rounds take half as many moves. Given-back weights are never tried again.
                for _ in range(cfg.backtracks):
                    if not breached or record["moves"] < 2:
                        break
                    weaker = self.weaker_half(moves)
                    self.undo(weaker)
                    moves = {n: d - weaker[n] for n, d in moves.items()}
                    record["moves"] = _count(moves)
                    record["backtracked"] = record.get("backtracked", 0) + 1
                    breached = self.guarded(guard_batch, guard_ref, anchor, record)
                if breached:
                    self.undo(moves)
                    self.edits_per_round = max(1, self.edits_per_round // 2)
                    record["undone"] = True
            full, quant = knowledge(self.model, tokenizer, forget), knowledge(self.quantized, tokenizer, forget)
            record |= {"seconds": time.perf_counter() - tick,  # the round alone (a growth comes after it)
                       "edited": self.edited_count(), "fisher_cost": self.spent, "forget_acc_full": full.score,
                       f"forget_acc_{cfg.format}": quant.score, "forget_true_prob_full": full.belief,
                       f"forget_true_prob_{cfg.format}": quant.belief}
            rounds.append(record)
            bar.set_postfix(full=full.score, quant=quant.score, edited=record["edited"])
            stop = callback is not None and bool(callback(record))
            if self.forgotten(full, quant.score):
                if self.passes_exam(tokenizer, forget, full, record):
                    return rounds, True, "converged"
            elif full.score <= cfg.target_forget_acc:
                # Full precision forgot, so its NPO push fades, while the twin still knows: the twin's own gradient
                # joins (a LoRA merge's hardening sat at NF4 0.40 with a forget loss of 0 for 4 rounds, docs/harden.md)
                self.exam_format = cfg.format
            if stop:
                return rounds, False, "callback"
            # Progress is the forgetting still to do: the mean belief in the answers, full and quantized; while
            # rewordings are in, also (NPO) the forget objective, as they are forgotten first: same-opposites-10's
            # objective fell by over 2% in 7 of its first 10 rounds while its belief sat at 0.9 (dur28). NPO's
            # objective saturates once an item is forgotten, so its fall is forgetting being done; GA's never does.
            belief, loss = record.get("relearn_belief", (full.belief + quant.belief) / 2), losses["forget_loss"]
            if ("relearn_belief" in record) != relearning:  # progress now reads another belief: start afresh
                relearning, best, since_best = not relearning, math.inf, 0
            believed = belief < best * (1 - cfg.min_progress)
            lowered = bool(variants) and cfg.objective == "npo" and loss < best_loss * (1 - cfg.min_progress)
            best, best_loss = belief if believed else best, loss if lowered else best_loss
            since_best = 0 if believed or lowered else since_best + 1
            if not moves or since_best >= cfg.patience:
                if grow is not None and grow(self):
                    record["grown_to"] = self.circuit_params()
                elif variants:
                    # No growth left: the rewordings leave the objective before the run gives up. A confident item's
                    # true choice has a vanishing gradient, so its rewordings took the moves: same-opposites-10 sat
                    # at 0.9 for 15 rounds and stalled at 0.8 with them (dur29), and converged without (dur27).
                    variants = ()
                    record["rewordings_dropped"] = True
                elif relearning:
                    # Forgotten in every reading but the relearning exam, and nothing left to try for it: the
                    # exam is dropped (recorded), so the run ends on what it has, not as a failure to forget.
                    self.relearn, self.exam_format = None, None
                    record["relearn_exam_dropped"] = True
                else:
                    return rounds, False, "no useful move left" if not moves else "stalled"
                best, best_loss, since_best = math.inf, math.inf, 0
        return rounds, False, "max_rounds"

    def chunks(self, tokenizer, items: Sequence[Item], refs: torch.Tensor | None = None) -> list[Chunk]:
        """The mean forget objective over `items` in chunks of `FORGET_CHUNK` items, each weighted by its share of
        them; `refs`: (NPO) their log-probs before the edit, read now when not given. `run` sums two such means,
        the forget items' and their rewordings': one mean over both diluted each fact's push (with four
        rewordings each, to a fifth) while its retain harm kept its weight: same-capitals-10 stalled at 0.50
        (dur12, docs/method.md); half of each stalled same-opposites-10 at 0.80 (dur19)."""
        out = []
        for start in range(0, len(items), FORGET_CHUNK):
            part = items[start : start + FORGET_CHUNK]
            batch = encode_forget(tokenizer, part, self.config.forget_on)
            ref = refs[start : start + len(part)] if refs is not None else None
            if ref is None and self.config.objective == "npo":
                with torch.no_grad():
                    ref = fact_logprob(self.model, batch)
            out.append((batch, ref, len(part) / len(items)))
        return out

    def references(self, tokenizer, items: Sequence[Item]) -> torch.Tensor | None:
        """(NPO) `items`' log-probs now, before the edit, for rounds that read some of them at a time; else None."""
        if self.config.objective != "npo" or not items:
            return None
        return chunk_references(self.chunks(tokenizer, items))

    def guarded(self, batch: Batch, reference: tuple[float, float], anchor: Anchor | None,
                record: dict[str, Any]) -> bool:
        """Read the retain NLL's rise over the original, and the anchor's drop (all recorded); True when either
        is past its guard (with `retain_guard_both_ways`, also a fall of the retain NLL past it)."""
        harm = [after - before for after, before in zip(self.nll(batch), reference)]
        record |= {"retain_nll_increase_full": harm[0], f"retain_nll_increase_{self.config.format}": harm[1]}
        moved = [abs(h) for h in harm] if self.config.retain_guard_both_ways else harm
        breached = self.config.retain_guard is not None and max(moved) > self.config.retain_guard
        if anchor is not None:
            drop = anchor.drop()
            record |= {"anchor_drop_full": drop[0], f"anchor_drop_{self.config.format}": drop[1]}
            breached |= max(drop) > self.config.anchor_guard
        return breached

    @torch.no_grad()
    def nll(self, batch: Batch) -> tuple[float, float]:
        """Mean answer NLL of `batch` in full precision and on the twin (a guard's two readings)."""
        return tuple(-answer_logprob(m, batch).mean().item() for m in (self.model, self.quantized))

    def forgotten(self, full: Knowledge, score: float) -> bool:
        """At most the target in full precision and in a quantized reading `score` (with `stop_on_gap`, which
        also knows no more than full precision: PTQ gap <= 0)."""
        within = max(full.score, score) <= self.config.target_forget_acc
        return within and (score <= full.score or not self.config.stop_on_gap)

    def passes_exam(self, tokenizer, forget: Sequence[Item], full: Knowledge, record: dict[str, Any]) -> bool:
        """The forget set forgotten in a copy of the model in each exam format, each recorded, then (with
        `relearn_exam`) the relearning exam passed; stops at a failure, whose reading the next rounds' forget gradient
        also reads (see `gradients`)."""
        self.exam_format = None
        for fmt in self.config.exam_formats:
            copy_ = quantized_copy(self.model, fmt)
            score = knowledge(copy_, tokenizer, forget).score
            del copy_
            record[f"forget_acc_{fmt}"] = score
            if not self.forgotten(full, score):
                self.exam_format = fmt
                return False
        if self.relearn is not None and not self.relearn.passes(self.model, tokenizer, record):
            self.exam_format = RELEARN  # the next rounds also push the held half on a copy so attacked
            return False
        return True

    def certify(self) -> Certificate:
        """Free the quantized twin (the rounds are over), then check the edit against the original weights."""
        del self.quantized, self.quantized_params
        before = {}
        for n, m in self.mask.items():
            before[n] = self.params[n].detach().clone()
            before[n][m] = self.original[n]
        edited = {n: self.params[n].detach() for n in self.mask}
        return check(before, edited, self.config.format, {n: self.layout[n] for n in self.mask})


def chunk_references(chunks: list[Chunk]) -> torch.Tensor:
    """(NPO) the log-probs before the edit that `Editor.chunks` read, in their items' order."""
    return torch.cat([ref for _, ref, _ in chunks])


RELEARN = "relearn"  # the relearning exam's reading (mansu.relearn_exam), as `Editor.exam_format` names it


def in_turn(n: int, per_round: int, step: int) -> list[int]:
    """Which of `n` rewordings round `step` (from 1) reads: one of each run of k = ceil(n / per_round), so about
    `per_round` a round and each once in every k rounds. All of them each round made a round cost twice as much
    with four kinds (cross-cities-5, dur28, docs/method.md)."""
    k = max(1, math.ceil(n / per_round))
    # The pick moves by one in each next run too: rewordings come item by item, kind by kind, so a round reads
    # a mix of kinds, not one kind for every item.
    return [j for j in range(n) if (j - j // k - (step - 1)) % k == 0]


def _count(moves: Flat) -> int:
    """How many weights `moves` moves."""
    return sum(int((d != 0).sum()) for d in moves.values())
