"""Before/after evaluation of an unlearning run: the JSON report, the comparison table, the plot.

A run evaluates forget and retain accuracy in full precision and in each quantized format, before and
after the edit; the PTQ gap (after.<fmt>.forget_acc - after.full.forget_acc, positive = quantization
brought knowledge back); the permanence certificate; CAD; the unlearning time and peak memory.
"""
from __future__ import annotations

import os
import random
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .data import Item
from .errors import MansuError, MansuWarning, mansu_warnings
from . import __version__
from .files import WRITTEN_BY, atomic_write, read_json
from .results import Result, to_jsonable


def peak_rss_mb() -> float:
    """This process's peak resident memory since start (or since `reset_peak_rss`), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak-memory count from the current usage (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def default_utility(forget: Sequence[Item], retain: Sequence[Item], per_set: int = 40, seed: int = 0
                    ) -> tuple[list[Item], list[str]]:
    """Utility items the edit never sees: up to `per_set` items (seeded) of every bundled fact set that
    shares no prompt with `forget` or `retain`; and those sets' names."""
    from .data import bundled_sets, load_bundled

    used = {it.prompt.strip() for it in [*forget, *retain]}
    items, names = [], []
    for name in bundled_sets():
        facts = load_bundled(name)
        if not used & {it.prompt.strip() for it in facts}:
            items += random.Random(seed).sample(facts, min(per_set, len(facts)))
            names.append(name)
    return items, names


def accuracies(model, tokenizer, sets: Mapping[str, Sequence[Item]], formats: Sequence[str],
               probes: bool = True, forget_only: Sequence[str] = (), progress: bool = False
               ) -> dict[str, dict[str, Any]]:
    """{'full'|format: {<set>_acc, <set>_true_prob} for each named set (forget, retain, utility), forget_correct
    (per forget item with choices, whether its answer won), and with `probes` the forget set's paraphrase accuracy
    (None without paraphrases) and generation recall}. The formats in `forget_only` score the forget set alone
    (forgetting must hold in each; utility is watched where the targets are stated, full precision and the
    deployed format). `progress`: one bar over the readings' sets and probes (a default utility set takes
    minutes on a CPU)."""
    from tqdm.auto import tqdm

    from .evaluation import evaluate
    from .probes import generation_recall, paraphrase_items, variants

    paraphrased = paraphrase_items(sets["forget"])

    def scored_sets(fmt: str) -> list[str]:
        if fmt in forget_only:
            return ["forget"]
        return [*sets, *(["paraphrase", "generation"] if probes else [])]

    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=sum(len(scored_sets(f)) for f in ["full", *formats]), desc="score", leave=False,
               disable=not progress)
    with bar:
        for fmt, scored in variants(model, formats):  # one quantized copy serves every set
            out[fmt] = {}
            for name in scored_sets(fmt):
                bar.set_postfix_str(f"{fmt} {name}")
                if name == "paraphrase":
                    out[fmt]["paraphrase_acc"] = (evaluate(scored, tokenizer, paraphrased, progress=False).accuracy
                                                  if paraphrased else None)
                elif name == "generation":
                    out[fmt]["generation_recall"] = generation_recall(scored, tokenizer, sets["forget"],
                                                                      progress=False)
                else:
                    result = evaluate(scored, tokenizer, sets[name], progress=False)
                    out[fmt] |= {f"{name}_acc": result.accuracy, f"{name}_true_prob": result.true_prob}
                    if name == "forget":  # which facts this reading still knows (the relearning attack's "before")
                        out[fmt]["forget_correct"] = result.correct
                bar.update()
    return out


def run_scores(model, tokenizer, sets: Mapping[str, Sequence[Item]], formats: Sequence[str], progress: bool = False
               ) -> dict[str, dict[str, Any]]:
    """What `run` measures before and after the edit: every set and probe in full precision and NF4 (where
    the targets are stated), the forget set alone in each other format."""
    return accuracies(model, tokenizer, sets, formats, forget_only=[f for f in formats if f != "nf4"],
                      progress=progress)


@dataclass(repr=False)
class RunReport(Result):
    """One unlearning run, before and after, in full precision and per quantized format."""

    method: str
    model: str
    n_forget: int
    n_retain: int
    formats: list[str]
    before: dict[str, dict[str, Any]]  # per reading ('full', each format): `accuracies`' scores
    after: dict[str, dict[str, Any]]
    ptq_gap: dict[str, float]
    permanence: dict[str, dict[str, Any]]
    cad: float | None
    cad_verdict: str | None
    timing_s: dict[str, float]
    peak_rss_mb: float
    peak_rss_mb_unlearn: float  # peak during the unlearning procedure alone, where the OS can reset it
    edited_fraction: float  # fraction of the model's parameters the edit changed
    config: dict[str, Any] = field(default_factory=dict)
    update_ratio_sample: list[float] = field(default_factory=list)  # |update| / NF4 bin width, for the plot
    converged: bool | None = None  # the method met its own forget target (see UnlearnResult.converged)
    n_utility: int = 0  # items of the untouched utility set (`utility_acc` in before/after)
    utility_sets: list[str] = field(default_factory=list)  # bundled sets it was drawn from, if by default
    relearn: dict[str, Any] | None = None  # the relearning attack after the edit (mansu.probes.RelearnResult)
    cad_nf4: float | None = None  # CAD of the edited model's NF4 copy against the original circuit
    stop_reason: str = ""  # why the method stopped (UnlearnResult.stop_reason): "converged", or why not
    rounds: list[dict[str, Any]] = field(default_factory=list)  # every round's record (UnlearnResult.rounds)
    warnings: list[str] = field(default_factory=list)  # the MansuWarnings the edit raised (also shown when raised)
    named_neighbours: list[dict[str, Any]] = field(default_factory=list)  # the items `relation_neighbours` added to
    # the retain set (UnlearnResult.named_neighbours)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "RunReport":
        """A report saved by `save_json` (e.g. by `mansu run --out`)."""
        return cls(**read_json(path))

    def summary(self) -> dict[str, Any]:
        fmt = "nf4"  # every run scores it (see `run`)
        out = {"method": self.method, "converged": self.converged, "stop_reason": self.stop_reason,
               "forget_full": self.after["full"]["forget_acc"],
               "utility_full": self.after["full"].get("utility_acc"), "retain_full": self.after["full"]["retain_acc"]}
        if fmt in self.after:
            out |= {f"forget_{fmt}": self.after[fmt]["forget_acc"], f"utility_{fmt}": self.after[fmt].get("utility_acc"),
                    f"ptq_gap_{fmt}": self.ptq_gap[fmt], "flip_fraction": self.permanence[fmt]["fraction"]}
        # The probes beyond the exact prompt, where the run measured them: they fail more often than forgetting does
        for reading in ("full", fmt):
            if self.after.get(reading, {}).get("paraphrase_acc") is not None:
                out[f"paraphrase_{reading}"] = self.after[reading]["paraphrase_acc"]
        if self.relearn is not None and self.relearn["before"].get("full") is not None:
            out["relearned_full"] = self.relearn["after"]["full"] - self.relearn["before"]["full"]
        return out | {"cad": self.cad, "cad_nf4": self.cad_nf4, "unlearn_s": self.timing_s.get("unlearn")}


def comparison_table(reports: Sequence[RunReport], fmt: str = "nf4") -> str:
    """Side-by-side table of runs: forgetting (full, quantized, gap), untouched utility, the probes of
    forgetting beyond the prompt, retain, flips, CAD, time and memory. '-' marks what a run did not measure."""
    def num(x: Any, spec: str = ".2f") -> str:
        return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)

    def accuracy_cells(acc: dict[str, dict[str, float | None]]) -> list[str]:
        return [num(acc[f].get(key)) for key, f in (("forget_acc", "full"), ("forget_acc", fmt),
                                                   ("utility_acc", "full"), ("utility_acc", fmt),
                                                   ("paraphrase_acc", "full"), ("paraphrase_acc", fmt),
                                                   ("generation_recall", "full"), ("retain_acc", "full"))]

    def relearned(r: RunReport) -> str:
        return "-" if r.relearn is None else f"{num(r.relearn['before']['full'])}->{num(r.relearn['after']['full'])}"

    cols = ["", "forget full", f"forget {fmt}", f"PTQ gap {fmt}", "utility full", f"utility {fmt}",
            "paraphr full", f"paraphr {fmt}", "gen recall", "retain full", "relearn", "flipped/changed", "CAD",
            "CAD nf4", "unlearn s", "peak MiB"]
    before = accuracy_cells(reports[0].before)
    rows = [["before", *before[:2], "", *before[2:], "", "", "", "", "", ""]]
    for r in reports:
        perm, cells = r.permanence[fmt], accuracy_cells(r.after)
        rows.append([r.method, *cells[:2], num(r.ptq_gap[fmt], "+.2f"), *cells[2:], relearned(r),
                     f"{perm['flipped']}/{perm['changed']}", num(r.cad, ".3f"), num(r.cad_nf4, ".3f"),
                     num(r.timing_s["unlearn"], ".0f"),
                     num(r.peak_rss_mb_unlearn, ".0f")])
    widths = [max(len(str(row[i])) for row in [cols] + rows) for i in range(len(cols))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [cols] + rows)


def plot_update_ratios(reports: Sequence[RunReport], path: str | os.PathLike) -> Path:
    """A PNG histogram of log10(|update| / NF4 bin width) per method: far left of 0, NF4 rounds the edit away."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in reports:
        ratios = torch.tensor(r.update_ratio_sample, dtype=torch.float64)
        ratios = ratios[ratios > 0]
        if len(ratios):
            median = float(ratios.median())
            ax.hist(torch.log10(ratios).numpy(), bins=60, alpha=0.6, density=True,
                    label=f"{r.method} (median {median:.3g}; {r.permanence['nf4']['changed']:,} weights changed)")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.text(0.02, 0.97, "one bin width", transform=ax.get_xaxis_transform(), va="top")
    ax.set_xlabel("log10(|update| / NF4 bin width)  per changed weight")
    ax.set_ylabel("density")
    ax.set_title("Edit size per changed weight, in NF4 bin widths", fontsize=11)
    if ax.get_legend_handles_labels()[0]:  # no edit changed a weight: nothing to label
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        mark = {"Software": f"{WRITTEN_BY} {__version__}"}  # lets a later run know it may replace this file
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata=mark))
    finally:
        plt.close(fig)


def run(model, tokenizer, forget: Sequence[Item], retain: Sequence[Item], config, model_name: str = "",
        formats: Sequence[str] = ("nf4",), save: str | os.PathLike | None = None,
        utility: Sequence[Item] | None = None, relearn: bool = False,
        before: dict[str, dict[str, Any]] | None = None) -> RunReport:
    """Evaluate, unlearn (in place), evaluate again, check permanence and CAD: one method's report.
    `utility`: items the edit never sees (default: the bundled sets unrelated to forget and retain);
    `relearn`: also run `mansu.probes.relearn_attack` on the edited model; `before`: the unedited model's
    scores (`before` of an earlier report on the same model, items and formats, or `run_scores`), not
    measured again. Retain, utility and the probes are scored in full precision and NF4; the forget set in
    every format."""
    from .attribution import attribute_circuit
    from .circuit_divergence import cad
    from .data import check_disjoint, load_anchor
    from .pipeline import MansuConfig, unlearn
    from .models import save_model
    from .probes import relearn_attack
    from .quant import check, parse_formats, quantized_copy

    start = time.perf_counter()
    formats = [f.name for f in parse_formats(formats)]
    if "nf4" not in formats:
        formats.insert(0, "nf4")  # the deployed format the paper's properties are stated for
    utility_sets: list[str] = []
    if utility is None:
        utility, utility_sets = default_utility(forget, retain)
    check_disjoint(forget=forget, retain=retain, utility=utility)
    if isinstance(config, MansuConfig) and config.protect is not None:  # the edit also keeps these: not untouched
        check_disjoint(utility=utility, protection=load_anchor(config.protect, forget))
    sets = {"forget": forget, "retain": retain} | ({"utility": utility} if utility else {})
    if before is None:
        before = run_scores(model, tokenizer, sets, formats, config.progress)
    elif set(before) != {"full", *formats}:
        raise MansuError(f"`before` scores {sorted(before)}, but this run needs {sorted(['full', *formats])}")
    # CAD needs the original model's forget circuit. MANSU finds it as its first (timed) step; for the
    # baselines it is attributed here, before the edit and outside the timed procedure.
    circuit = None if isinstance(config, MansuConfig) else attribute_circuit(
        model, tokenizer, forget, retain, MansuConfig().circuit)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    reset_peak_rss()
    tick = time.perf_counter()
    with mansu_warnings() as raised:
        result = unlearn(model, tokenizer, forget, retain, config)
        _warn_if_utility_named(result.named_neighbours, utility)
    unlearn_s = time.perf_counter() - tick
    peak_unlearn = peak_rss_mb()
    after = run_scores(model, tokenizer, sets, formats, config.progress)
    attack = relearn_attack(model, tokenizer, forget, formats, progress=config.progress,
                            known={f: after[f]["forget_correct"] for f in after}) if relearn else None
    certificate = check(original, model, formats)
    del original
    # CAD needs the forget circuit of the original model; baselines have none, so it is attributed here
    # for them (outside the timed procedure) with MANSU's default circuit settings.
    cad_result = cad(model, tokenizer, result.circuit or circuit, forget, retain, progress=config.progress)
    # ... and on the deployed NF4 model: an edit that quantization rounds away leaves that model's circuit as
    # it was, whatever the full-precision CAD says.
    cad_nf4 = cad(quantized_copy(model, "nf4"), tokenizer, result.circuit or circuit, forget, retain,
                  progress=config.progress).value
    if save is not None:
        save_model(model, tokenizer, save)
    nf4 = certificate["nf4"]
    return RunReport(
        method=result.method, model=model_name, n_forget=len(forget), n_retain=len(retain), formats=formats,
        before=before, after=after,
        ptq_gap={f: after[f]["forget_acc"] - after["full"]["forget_acc"] for f in formats},
        permanence={f: certificate[f].summary() | {"ratio_quantiles": certificate[f].ratio_quantiles}
                    for f in formats},
        cad=cad_result.value, cad_verdict=cad_result.verdict, cad_nf4=cad_nf4,
        timing_s={"unlearn": unlearn_s, **{f"unlearn.{k}": v for k, v in result.timing_s.items()},
                  "total": time.perf_counter() - start},
        peak_rss_mb=peak_rss_mb(), peak_rss_mb_unlearn=peak_unlearn,
        edited_fraction=nf4.changed / sum(p.numel() for p in model.parameters()),
        config=result.config, update_ratio_sample=nf4.ratio_sample.tolist(), converged=result.converged,
        n_utility=len(utility), utility_sets=utility_sets, relearn=attack.to_dict() if attack else None,
        stop_reason=result.stop_reason, rounds=result.rounds, warnings=raised,
        named_neighbours=to_jsonable(result.named_neighbours),
    )


def _warn_if_utility_named(named: Sequence[Item], utility: Sequence[Item]) -> None:
    """Warn when the edit kept utility items itself (`relation_neighbours` named their subjects): the utility set
    is then not untouched, and its score flatters the edit."""
    asked = sorted({it.prompt.strip() for it in named} & {it.prompt.strip() for it in utility})
    if asked:
        warnings.warn(f"{len(asked)} utility item(s) are among the neighbours the model named for the retain set "
                      f"(relation_neighbours), e.g. {asked[0]!r}: the edit kept them, so the utility set is not "
                      "untouched; leave them out of it, or set relation_neighbours=0", MansuWarning, stacklevel=2)
