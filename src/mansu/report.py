"""Before/after evaluation of an unlearning run: the JSON report, the comparison table, the plot.

A run evaluates forget and retain accuracy in full precision and in each quantized format, before and
after the edit; the PTQ gap (after.<fmt>.forget_acc - after.full.forget_acc, positive = quantization
brought knowledge back); the permanence certificate; CAD; the unlearning time and peak memory.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .data import Item
from . import __version__
from .files import WRITTEN_BY, atomic_write, read_json
from .results import Result


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


def accuracies(model, tokenizer, forget: Sequence[Item], retain: Sequence[Item],
               formats: Sequence[str], backend: str = "fake") -> dict[str, dict[str, float]]:
    """{'full'|format: {forget_acc, retain_acc, forget_true_prob, retain_true_prob}}."""
    from .evaluate import evaluate
    from .quant import quantized_copy

    out: dict[str, dict[str, float]] = {}
    for fmt in ["full", *formats]:
        scored = model if fmt == "full" else quantized_copy(model, fmt, backend)  # one copy serves both sets
        out[fmt] = {}
        for split_name, items in (("forget", forget), ("retain", retain)):
            result = evaluate(scored, tokenizer, items, progress=False)
            out[fmt] |= {f"{split_name}_acc": result.accuracy, f"{split_name}_true_prob": result.true_prob}
        del scored
    return out


@dataclass(repr=False)
class RunReport(Result):
    """One unlearning run, before and after, in full precision and per quantized format."""

    method: str
    model: str
    n_forget: int
    n_retain: int
    formats: list[str]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
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

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "RunReport":
        """A report saved by `save_json` (e.g. by `mansu run --out`)."""
        return cls(**read_json(path))

    def summary(self) -> dict[str, Any]:
        fmt = self.formats[0] if self.formats else None
        out = {"method": self.method, "forget_full": self.after["full"]["forget_acc"],
               "retain_full": self.after["full"]["retain_acc"]}
        if fmt:
            out |= {f"forget_{fmt}": self.after[fmt]["forget_acc"], f"retain_{fmt}": self.after[fmt]["retain_acc"],
                    f"ptq_gap_{fmt}": self.ptq_gap[fmt], "flip_fraction": self.permanence[fmt]["fraction"]}
        return out | {"cad": self.cad, "unlearn_s": self.timing_s.get("unlearn")}


def comparison_table(reports: Sequence[RunReport], fmt: str = "nf4") -> str:
    """Side-by-side table of runs: forget/retain accuracy full and quantized, gap, flips, CAD, time, memory."""
    def num(x: Any, spec: str = ".2f") -> str:
        return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)

    cols = ["", "forget full", f"forget {fmt}", "retain full", f"retain {fmt}", f"PTQ gap {fmt}",
            "flipped/changed", "CAD", "unlearn s", "peak MiB"]
    rows = [["before"] + [num(reports[0].before["full"]["forget_acc"]), num(reports[0].before[fmt]["forget_acc"]),
                          num(reports[0].before["full"]["retain_acc"]), num(reports[0].before[fmt]["retain_acc"]),
                          "", "", "", "", ""]]
    for r in reports:
        perm = r.permanence[fmt]
        rows.append([r.method, num(r.after["full"]["forget_acc"]), num(r.after[fmt]["forget_acc"]),
                     num(r.after["full"]["retain_acc"]), num(r.after[fmt]["retain_acc"]), num(r.ptq_gap[fmt], "+.2f"),
                     f"{perm['flipped']}/{perm['changed']}", num(r.cad, ".3f"), num(r.timing_s["unlearn"], ".0f"),
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
        formats: Sequence[str] = ("nf4",), save: str | os.PathLike | None = None) -> RunReport:
    """Evaluate, unlearn (in place), evaluate again, check permanence and CAD: one method's report."""
    from .attribution import attribute_circuit
    from .cad import cad
    from .pipeline import MansuConfig, unlearn
    from .models import save_model
    from .quant import check, parse_formats

    start = time.perf_counter()
    formats = [f.name for f in parse_formats(formats)]
    if "nf4" not in formats:
        formats.insert(0, "nf4")  # the deployed format the paper's properties are stated for
    before = accuracies(model, tokenizer, forget, retain, formats)
    # CAD needs the original model's forget circuit. MANSU finds it as its first (timed) step; for the
    # baselines it is attributed here, before the edit and outside the timed procedure.
    circuit = None if isinstance(config, MansuConfig) else attribute_circuit(
        model, tokenizer, forget, retain, MansuConfig().circuit)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    reset_peak_rss()
    tick = time.perf_counter()
    result = unlearn(model, tokenizer, forget, retain, config)
    unlearn_s = time.perf_counter() - tick
    peak_unlearn = peak_rss_mb()
    after = accuracies(model, tokenizer, forget, retain, formats)
    certificate = check(original, model, formats)
    del original
    # CAD needs the forget circuit of the original model; baselines have none, so it is attributed here
    # for them (outside the timed procedure) with MANSU's default circuit settings.
    cad_result = cad(model, tokenizer, result.circuit or circuit, forget, retain)
    if save is not None:
        save_model(model, tokenizer, save)
    nf4 = certificate["nf4"]
    return RunReport(
        method=result.method, model=model_name, n_forget=len(forget), n_retain=len(retain), formats=formats,
        before=before, after=after,
        ptq_gap={f: after[f]["forget_acc"] - after["full"]["forget_acc"] for f in formats},
        permanence={f: certificate[f].summary() | {"ratio_quantiles": certificate[f].ratio_quantiles}
                    for f in formats},
        cad=cad_result.value, cad_verdict=cad_result.verdict,
        timing_s={"unlearn": unlearn_s, **{f"unlearn.{k}": v for k, v in result.timing_s.items()},
                  "total": time.perf_counter() - start},
        peak_rss_mb=peak_rss_mb(), peak_rss_mb_unlearn=peak_unlearn,
        edited_fraction=nf4.changed / sum(p.numel() for p in model.parameters()),
        config=result.config, update_ratio_sample=nf4.ratio_sample.tolist(),
    )
