"""The durability benchmark: does the forgetting hold, on fact sets and splits no default was tuned on?

    python benchmarks/durability.py run --workers 2               # the whole suite (resumable: its records live in
                                                                  # benchmarks/results/durability), then the report
    python benchmarks/durability.py report                        # regenerate docs/results.md and the plots
    python benchmarks/durability.py run --smoke --out smoke       # one small split, a few minutes (CI runs it)
    python benchmarks/durability.py run --out v --mansu '{"saturate_on": "quantized"}' --splits same-capitals-10
                                                                  # a candidate default, on chosen splits
    python benchmarks/durability.py run --out p --train-paraphrases 1 --splits same-capitals-10
                                                                  # every method also trains on each forget
                                                                  # item's first paraphrase; the probe reads the rest
    python benchmarks/durability.py compare benchmarks/results/durability v  # MANSU (seed 0) split by split, per folder
    python benchmarks/durability.py report --out v --doc docs/candidate.md
                                                                  # a folder's report elsewhere than results.md

Splits are built from the bundled fact sets: same-domain (forget n items of a domain, retain the rest of it)
and cross-domain (forget n items of one domain, retain 20 items of each of two others), n in 5 / 10 / 20.
Utility is scored on the bundled sets the split does not touch. MANSU runs with three seeds, each baseline
with one, the ablations on a subset. Every run is its own process (so its peak memory is its own) and
writes one JSON file; a run whose file exists is skipped, so an interrupted suite resumes where it stopped.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("nf4", "nf4-dq", "fp4", "int8", "q4_0", "q8_0")
BASELINES = ("ga", "graddiff", "npo")
SIZES = (5, 10, 20)
MANSU_SEEDS = (0, 1, 2)
# MANSU with one part switched off; run on the first ABLATION_SPLITS splits, seed 0.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-floor": {"floor": False},
    "no-projector": {"energy": None},
    "no-fisher": {"fisher_cost": False},
    "random-circuit": {"circuit": {"random": True}},
}
ABLATION_SPLITS = 4
# Every row name (see `label`), in the tables' order; the plots colour each by its place here.
LABELS = ("mansu", *(f"mansu ({a})" for a in ABLATIONS), *BASELINES)
# The targets of issue #10, checked on every MANSU run (thresholds, never tuned to the results).
TARGETS = {"forget_acc": 0.35, "ptq_gap": 0.0, "utility_drop": 0.05, "paraphrase_acc": 0.45}
SUITE_HOURS = 2.0  # issue #10: the full run "within about two hours" on the 2-core machine (a quarter over is "about")
# Accuracies are ratios of item counts, so a difference of two can miss its exact value by float rounding
# (0.99 - 0.94 = 0.05000000000000004, 1 - 1/3 > 2/3): comparisons treat values this close as equal.
ROUNDING = 1e-9
DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"
RUNS = Path(__file__).resolve().parent / "results" / "durability"
# Packages whose versions a run's numbers can depend on, recorded with each run (see `environment`).
PACKAGES = ("torch", "transformers", "bitsandbytes", "accelerate", "numpy", "gguf")


@dataclass(frozen=True)
class Split:
    """Forget `n` items of `domain` (seeded); retain the rest of it (same-domain) or 20 of each `others`. With
    `train_paraphrases`, each forget item's first that many paraphrases join the forget set as items of their
    own (`mansu.train_on_paraphrases`), for every method; the paraphrase probe reads the rest."""

    name: str
    domain: str
    n: int
    others: tuple[str, ...] = ()

    def items(self, seed: int = 0, train_paraphrases: int = 0):
        import mansu

        forget, rest = mansu.split(mansu.load_bundled(self.domain), self.n, seed=seed)
        forget = mansu.train_on_paraphrases(forget, train_paraphrases)
        if not self.others:
            return forget, rest
        retain = [it for d in self.others for it in mansu.split(mansu.load_bundled(d), 20, seed=seed)[0]]
        return forget, retain


def suite(smoke: bool = False) -> list[Split]:
    """Per bundled domain one same-domain and one cross-domain split, sizes rotating through 5/10/20."""
    import mansu

    domains = mansu.bundled_sets()
    if smoke:
        # cross-domain, so that the retain set is 20 items, not the 64 other capitals (CI's smoke test: 408 -> 306 s)
        return [Split("smoke-capitals-5", "capitals", 5, ("currencies",))]
    splits = []
    for i, domain in enumerate(domains):
        same, cross = SIZES[i % 3], SIZES[(i + 1) % 3]
        others = (domains[(i + 1) % len(domains)], domains[(i + 2) % len(domains)])
        splits += [Split(f"same-{domain}-{same}", domain, same),
                   Split(f"cross-{domain}-{cross}", domain, cross, others)]
    return splits


def jobs(splits: list[Split], smoke: bool) -> list[dict[str, Any]]:
    """Every (split, method, seed, ablation) run of the suite, broadest evidence first: MANSU (seed 0) and
    GradDiff on every split, then the other baselines, MANSU's other seeds, and the ablations last, so an
    interrupted suite still covers every split."""
    if smoke:
        return [{"split": s.name, "method": m, "seed": 0, "ablation": None} for s in splits for m in ("mansu", "graddiff")]
    waves = [[("mansu", 0, None), ("graddiff", 0, None)], [(m, 0, None) for m in BASELINES if m != "graddiff"],
             [("mansu", seed, None) for seed in MANSU_SEEDS[1:]]]
    out = [{"split": s.name, "method": m, "seed": seed, "ablation": a} for wave in waves for s in splits
           for m, seed, a in wave]
    out += [{"split": s.name, "method": "mansu", "seed": 0, "ablation": a}
            for s, a in itertools.product(splits[:ABLATION_SPLITS], ABLATIONS)]
    return out


def job_key(job: dict[str, Any]) -> str:
    return f"{job['split']}.{job['method']}{'.' + job['ablation'] if job['ablation'] else ''}.seed{job['seed']}"


def config_for(job: dict[str, Any], smoke: bool):
    """The method's config: the library defaults, an ablation's change, and smaller budgets for --smoke."""
    import mansu

    if job["method"] != "mansu":
        return mansu.BaselineConfig(method=job["method"], seed=job["seed"], **({"max_steps": 10} if smoke else {}))
    overrides = dict(job.get("overrides", {})) | ABLATIONS.get(job["ablation"], {})
    if "circuit" in overrides:
        overrides["circuit"] = {**mansu.MansuConfig().circuit.__dict__, **overrides["circuit"]}
    return mansu.MansuConfig(seed=job["seed"], progress=False, **overrides, **({"max_rounds": 3} if smoke else {}))


def bnb_load_accuracy(model, tokenizer, sets: dict[str, list]) -> dict[str, float]:
    """Accuracies of `model` saved and reloaded through transformers' own bitsandbytes NF4 load: what a user
    who quantizes the released checkpoint with `BitsAndBytesConfig` runs."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import mansu

    with tempfile.TemporaryDirectory() as tmp:
        mansu.save_model(model, tokenizer, Path(tmp) / "model")
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float32)
        loaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "model", quantization_config=config).eval()
        return {f"{name}_acc": mansu.evaluate(loaded, tokenizer, items, progress=False).accuracy
                for name, items in sets.items()}


def environment() -> dict[str, Any]:
    """What a run's numbers depend on besides its job: the commit of the checkout mansu was imported from (and
    its changed files under src/ and benchmarks/), the package versions, and the threads. dur27's cross-cities-5
    run did not reproduce at its own commit (docs/method.md), and nothing recorded what else it ran with."""
    import importlib.metadata
    import platform

    import torch

    import mansu

    source = Path(mansu.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError):  # an installed wheel, or no git: nothing to record
            return None

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/benchmarks") or ""
    return {"mansu_source": str(source), "commit": commit.strip() if commit else None,
            "changed": [line[3:] for line in changed.splitlines()], "python": platform.python_version(),
            **{name: importlib.metadata.version(name) for name in PACKAGES}, "threads": torch.get_num_threads()}


def run_job(job: dict[str, Any], out: Path, smoke: bool) -> None:
    """One run in this process: the method's report (mansu.report.run) plus the real bitsandbytes load. The
    unedited model's scores are measured once per split and shared by its runs (out/before/)."""
    import mansu
    from mansu.report import default_utility, run, run_scores

    tick = time.perf_counter()
    split = {s.name: s for s in suite(smoke)}[job["split"]]
    forget, retain = split.items(train_paraphrases=job.get("train_paraphrases", 0))
    utility, _ = default_utility(forget, retain, per_set=5 if smoke else 20)
    model, tokenizer = mansu.load_model()
    formats = ["nf4"] if smoke else list(FORMATS)
    sets = {"forget": forget, "retain": retain, "utility": utility}
    cached = out / "before" / f"{split.name}.json"
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.with_suffix(".lock"), "w") as lock:  # a parallel run of the same split waits, then reads
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cached.exists():
            before = run_scores(model, tokenizer, sets, formats)
            before["bnb_nf4"] = bnb_load_accuracy(model, tokenizer, {"forget": forget, "utility": utility})
            mansu.files.write_json(cached, before)
    before = mansu.files.read_json(cached)
    bnb_before = before.pop("bnb_nf4")
    report = run(model, tokenizer, forget, retain, config_for(job, smoke), "smollm2-135m", formats,
                 utility=utility, relearn=True, before=before)
    record = report.to_dict() | {"job": job, "bnb_nf4_before": bnb_before,
                                 "bnb_nf4": bnb_load_accuracy(model, tokenizer, {"forget": forget, "utility": utility})}
    record["environment"] = environment()
    record["job_s"] = time.perf_counter() - tick
    mansu.files.write_json(out / "runs" / f"{job_key(job)}.json", record)


def run_suite(out: Path, smoke: bool, workers: int = 1, overrides: dict[str, Any] | None = None,
              only: list[str] | None = None, train_paraphrases: int = 0, doc: Path = DOC) -> None:
    """Every job not yet done (of the splits in `only`, if given), each in its own process (`workers` at a
    time, one thread each when more than one, so every run sees the same share of the machine); then the
    report. `overrides` change MANSU's config from the library defaults; `train_paraphrases` the splits' forget
    sets, for every method (see Split); each run records them. The report goes to `doc`."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    splits = suite(smoke)
    unknown = sorted(set(only or ()) - {s.name for s in splits})
    if unknown:
        raise SystemExit(f"unknown splits {unknown}; the suite has {[s.name for s in splits]}")
    planned = [j | ({"overrides": overrides} if overrides and j["method"] == "mansu" else {})
               | ({"train_paraphrases": train_paraphrases} if train_paraphrases else {})
               for j in jobs([s for s in splits if not only or s.name in only], smoke)]
    for job in planned:  # resuming must not mix configs or data: a finished run must have had the same ones
        done = out / "runs" / f"{job_key(job)}.json"
        if done.exists():
            had = json.loads(done.read_text())["job"]
            for key, default in (("overrides", {}), ("train_paraphrases", 0)):
                if had.get(key, default) != job.get(key, default):
                    raise SystemExit(f"{done} ran with {key} {had.get(key, default)}, not {job.get(key, default)}: "
                                     f"choose another --out")
    todo = [j for j in planned if not (out / "runs" / f"{job_key(j)}.json").exists()]
    print(f"{len(todo)} runs to do in {out}/runs", flush=True)
    env = os.environ | ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if workers > 1 else {})

    def launch(job: dict[str, Any]) -> tuple[str, int, float]:
        tick = time.perf_counter()
        cmd = [sys.executable, __file__, "job", "--out", str(out), "--job", json.dumps(job)] + (["--smoke"] * smoke)
        return job_key(job), subprocess.run(cmd, env=env).returncode, time.perf_counter() - tick

    failed = []
    with ThreadPoolExecutor(workers) as pool:
        for done in tqdm(as_completed([pool.submit(launch, j) for j in todo]), total=len(todo), desc="durability"):
            key, code, seconds = done.result()
            tqdm.write(f"{key}: {'failed' if code else 'done'} in {seconds:.0f} s")
            if code:
                failed.append(key)
    if failed:
        raise SystemExit(f"runs failed (their messages are above): {', '.join(failed)}; rerun to resume")
    report(out, smoke, None if smoke else doc)


def metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers the targets are stated on, for one run."""
    before, after, formats = record["before"], record["after"], record["formats"]
    relearn = record.get("relearn") or {}
    nf4 = record["permanence"]["nf4"]
    return {
        "forget_full": after["full"]["forget_acc"],
        "forget_worst_format": max(after[f]["forget_acc"] for f in formats),
        "worst_format": max(formats, key=lambda f: after[f]["forget_acc"]),
        "forget_nf4": after["nf4"]["forget_acc"],
        "forget_bnb_nf4": record["bnb_nf4"]["forget_acc"],
        "ptq_gap_max": max(max(record["ptq_gap"].values()), record["bnb_nf4"]["forget_acc"] - after["full"]["forget_acc"]),
        "utility_drop_full": before["full"]["utility_acc"] - after["full"]["utility_acc"],
        "utility_drop_nf4": before["nf4"]["utility_acc"] - after["nf4"]["utility_acc"],
        "utility_drop_bnb_nf4": record["bnb_nf4_before"]["utility_acc"] - record["bnb_nf4"]["utility_acc"],
        "paraphrase_full": after["full"].get("paraphrase_acc"),
        "paraphrase_nf4": after["nf4"].get("paraphrase_acc"),
        "generation_recall": after["full"]["generation_recall"],
        "relearn_recovery": (relearn["after"]["full"] - relearn["before"]["full"]) if relearn else None,
        "certified": nf4["flipped"] == nf4["changed"] and nf4["collateral"] == 0,
        "cad": record["cad"],
        "cad_nf4": record.get("cad_nf4"),
        "converged": record.get("converged"),
        "unlearn_s": record["timing_s"]["unlearn"],
        "peak_mb": record["peak_rss_mb_unlearn"],
    }


def _past(value: float, target: str) -> bool:
    """`value` past `TARGETS[target]`; float rounding alone (see ROUNDING) never fails a target."""
    return value > TARGETS[target] + ROUNDING


def _not_below(value: float, bound: float) -> bool:
    """`value` >= `bound`, a float-rounding difference (see ROUNDING) counting as equal: a recovery of 1 - 1/3 is
    2/3's, not above it (cross-elements-5 in dur32 passed the relearning target by that last bit)."""
    return value > bound - ROUNDING


def failures(m: dict[str, Any]) -> list[str]:
    """Which of issue #10's targets a MANSU run misses (the relearning target is checked per split)."""
    out = []
    if _past(max(m["forget_full"], m["forget_worst_format"], m["forget_bnb_nf4"]), "forget_acc"):
        out.append(f"forget {m['forget_full']:.2f} full / {m['forget_worst_format']:.2f} {m['worst_format']} / "
                   f"{m['forget_bnb_nf4']:.2f} bnb")
    if _past(m["ptq_gap_max"], "ptq_gap"):
        out.append(f"PTQ gap {m['ptq_gap_max']:+.2f}")
    if _past(max(m["utility_drop_full"], m["utility_drop_nf4"], m["utility_drop_bnb_nf4"]), "utility_drop"):
        out.append(f"utility drop {m['utility_drop_full']:.3f} full / {m['utility_drop_nf4']:.3f} nf4 / "
                   f"{m['utility_drop_bnb_nf4']:.3f} bnb")
    for key in ("paraphrase_full", "paraphrase_nf4"):
        if m[key] is not None and _past(m[key], "paraphrase_acc"):
            out.append(f"{key.replace('_', ' ')} {m[key]:.2f}")
    if not m["certified"]:
        out.append("not certified")
    return out


def lowest_baseline_recovery(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per split, the lowest relearning recovery of any baseline run among `rows` (each with its "job")."""
    lowest: dict[str, float] = {}
    for row in rows:
        if row["job"]["method"] in BASELINES and row["relearn_recovery"] is not None:
            split = row["job"]["split"]
            lowest[split] = min(lowest.get(split, 1.0), row["relearn_recovery"])
    return lowest


def relearn_failure(row: dict[str, Any], lowest: dict[str, float]) -> list[str]:
    """The relearning target, missed or not: MANSU's recovery must be below every baseline's on the same split."""
    bound = lowest.get(row["job"]["split"])
    if bound is None or row["relearn_recovery"] is None or not _not_below(row["relearn_recovery"], bound):
        return []
    return [f"relearn recovery {row['relearn_recovery']:+.2f} >= a baseline's {bound:+.2f}"]


def missed(row: dict[str, Any], lowest: dict[str, float]) -> list[str]:
    """Every target of issue #10 a MANSU run misses, the relearning target against `lowest_baseline_recovery`."""
    return failures(row) + relearn_failure(row, lowest)


def config_changes(record: dict[str, Any]) -> str:
    """JSON of the fields in which a MANSU run's config differs from today's defaults (seed and progress aside;
    a field today's config lacks is left out), and the split's `train_paraphrases` where it had any."""
    from dataclasses import asdict

    import mansu

    defaults = json.loads(json.dumps(asdict(mansu.MansuConfig())))
    changes = {k: v for k, v in record["config"].items()
               if k in defaults and k not in ("seed", "progress") and v != defaults[k]}
    trained = record["job"].get("train_paraphrases", 0)
    return json.dumps(changes | ({"train_paraphrases": trained} if trained else {}), sort_keys=True)


def compare(outs: list[Path], seeds: tuple[int, ...] = (0,)) -> str:
    """A markdown table: per split and seed, each folder's MANSU run (no ablation) as converged; forget full /
    worst format; utility drop NF4; paraphrase full; relearning recovery; unlearn s; and the count of issue
    #10's targets missed, relearning against the baselines of every folder given (none: relearning aside).
    Each column is headed by its runs' `config_changes`. Below it, per folder, the same numbers over the runs
    it shares with the first folder, next to the first folder's on them."""
    import mansu

    records = {out: [mansu.files.read_json(p) for seed in sorted({0, *seeds})
                     for p in sorted((out / "runs").glob(f"*.seed{seed}.json"))] for out in outs}
    rows = [{"job": r["job"], **metrics(r)} for rs in records.values() for r in rs]
    lowest = lowest_baseline_recovery(rows)  # the baselines ran seed 0 alone
    graddiff = [r for r in rows if r["job"]["method"] == "graddiff"]
    cells: dict[str, dict[Path, str]] = {}
    runs: dict[Path, dict[str, dict]] = {}  # per folder, per split (and seed): its MANSU run's metrics and misses
    heads = []
    for out in outs:
        overrides = set()
        for record in records[out]:
            job = record["job"]
            if job["method"] != "mansu" or job["ablation"] or job["seed"] not in seeds:
                continue
            overrides.add(config_changes(record))
            m = metrics(record) | {"job": job}
            m["missed"] = missed(m, lowest)
            key = job["split"] + (f" seed {job['seed']}" if len(seeds) > 1 else "")
            runs.setdefault(out, {})[key] = m
            cells.setdefault(key, {})[out] = (
                f"{'yes' if m['converged'] else 'no'} {m['forget_full']:.2f} / {m['forget_worst_format']:.2f} "
                f"({m['worst_format']}) / {m['utility_drop_nf4']:.3f} / {_shown_number(m['paraphrase_full'], '.2f')} / "
                f"{_shown_number(m['relearn_recovery'], '+.2f')} / {m['unlearn_s']:.0f} s / {len(m['missed'])} missed")
        heads.append(f"{out.name} {' '.join(sorted(overrides))}")
    lines = ["| run | " + " | ".join(heads) + " |", "|---" * (len(outs) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(row.get(out, "-") for out in outs) + " |"
              for key, row in sorted(cells.items())]
    first = runs.get(outs[0], {})
    for out in outs[1:]:
        shared = sorted(set(runs.get(out, {})) & set(first))
        lines += ["", f"On the {len(shared)} runs {out.name} shares with {outs[0].name}:"]
        lines += [f"- {folder.name}: {_summary([runs[folder][s] for s in shared], graddiff)}"
                  for folder in (outs[0], out)]
    return "\n".join(lines)


def _summary(ms: list[dict[str, Any]], graddiff: list[dict[str, Any]]) -> str:
    """One line over some MANSU runs: every target met, converged, the means and spreads of the generalization
    and utility numbers, the misses by kind, and the unlearning time over GradDiff's on the same split (median,
    range; GradDiff ran seed 0 alone, so every seed's run is set against that one)."""
    if not ms:
        return "no run"
    kinds = ("utility", "paraphrase", "relearn", "forget", "PTQ")
    missed = ", ".join(f"{k} {sum(any(f.startswith(k) for f in m['missed']) for m in ms)}" for k in kinds)
    ratios = cost_ratios({"mansu": ms, "graddiff": graddiff}, seed=None)["time"]
    time = (f"; time {statistics.median(ratios):.2f}x GradDiff's (median, {min(ratios):.2f}-{max(ratios):.2f})"
            if ratios else "")
    met, converged = sum(not m["missed"] for m in ms), sum(bool(m["converged"]) for m in ms)
    return (f"every target met on {met} of {len(ms)}, converged {converged}; "
            f"NF4 utility drop {_mean_spread([m['utility_drop_nf4'] for m in ms])}, paraphrases "
            f"{_mean_spread([m['paraphrase_full'] for m in ms])} full / "
            f"{_mean_spread([m['paraphrase_nf4'] for m in ms])} NF4, "
            f"relearning {_mean_spread([m['relearn_recovery'] for m in ms])}; runs missing each kind: {missed}{time}")


def _shown_number(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or "-" for a number a run did not measure (no paraphrases, no relearning)."""
    return "-" if value is None else format(value, spec)


def _mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(out: Path, smoke: bool, doc: Path | None = None) -> None:
    """Aggregate every run into results.json, the markdown report and the plots."""
    import mansu

    records = [mansu.files.read_json(p) for p in sorted((out / "runs").glob("*.json"))]
    if not records:
        raise SystemExit(f"no runs in {out}/runs yet")
    rows = [{"job": r["job"], **metrics(r)} for r in records]
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(label(row["job"]), []).append(row)
    lowest = lowest_baseline_recovery(rows)
    mansu_rows = by_method.get("mansu", [])
    for row in mansu_rows:
        row["failures"] = missed(row, lowest)
    mansu.files.write_json(out / "results.json", {"rows": rows})
    planned = len(jobs(suite(smoke), smoke))
    overrides = sorted({config_changes(r) for r in records
                        if r["job"]["method"] == "mansu" and not r["job"]["ablation"]})
    text = markdown(by_method, mansu_rows, run_command(out, smoke, records, doc), planned,
                    sum(r.get("job_s", 0.0) for r in records), overrides) + neighbour_section(out)
    plots(by_method, records, [out / "durability.png"] + ([doc.with_suffix(".png")] if doc else []))
    if doc is not None:
        mansu.files.write_text(doc, text, replace=True)  # the doc is this script's own output
    print(text)


def neighbour_section(out: Path) -> str:
    """The markdown section of `benchmarks/neighbours.py`'s records under `out/neighbours` (one JSON line per
    split, a file per method), or "" without any: the forget domain's items no set asks, which no target reads."""
    rows = {}
    for path in sorted((out / "neighbours").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["split"], row["method"]] = row
    if not rows:
        return ""
    methods = sorted({m for _, m in rows}, key=lambda m: (m != "mansu", m))

    def cell(row: dict | None, key: str) -> str:
        if row is None:
            return "-"
        b, a = row["before"][key], row["after"][key]
        return f"{b['full']:.2f} -> {a['full']:.2f} / {b['nf4']:.2f} -> {a['nf4']:.2f}"

    lines = ["", "## Not in the targets: the forgotten relation's other subjects", "",
             "On a cross-domain split, the forget domain's items that neither set asks (the same relation about other "
             "subjects) are in no utility set: `default_utility` leaves out every bundled set a split touches. "
             "`benchmarks/neighbours.py` scores them before and after one run of each method (seed-0 config), full "
             "precision / NF4 (docs/method.md, 2026-12-07, third session):", "",
             "```bash", "cd benchmarks && python neighbours.py SPLIT --method METHOD", "```", "",
             "| split (neighbours) | " + " | ".join(f"{m}: forget | {m}: neighbours" for m in methods) + " |",
             "|---|" + "---|---|" * len(methods)]
    for split in sorted({s for s, _ in rows}):
        n = next(r["n_neighbours"] for (s, _), r in rows.items() if s == split)
        lines.append(f"| {split} ({n}) | " + " | ".join(f"{cell(rows.get((split, m)), 'forget')} | "
                                                        f"{cell(rows.get((split, m)), 'neighbours')}"
                                                        for m in methods) + " |")
    for m in methods:
        lost = [r["before"]["neighbours"]["nf4"] - r["after"]["neighbours"]["nf4"]
                for (_, mm), r in rows.items() if mm == m]
        lines.append(f"\n{m}: the neighbours lose {_mean_spread(lost)} in NF4 (mean ± spread over {len(lost)} splits, "
                     f"{min(lost):.2f}-{max(lost):.2f}).")
    return "\n".join(lines) + "\n"


def run_command(out: Path, smoke: bool, records: list[dict[str, Any]], doc: Path | None = None) -> str:
    """The `run` command that made `records`: with their MANSU overrides and paraphrase training where all
    runs share one, and `--doc` where the report goes elsewhere than docs/results.md."""
    overrides = {json.dumps(r["job"].get("overrides", {}), sort_keys=True) for r in records
                 if r["job"]["method"] == "mansu" and not r["job"]["ablation"]}
    trained = {r["job"].get("train_paraphrases", 0) for r in records}
    return (f"python benchmarks/durability.py run{' --smoke' if smoke else ''} --out {_shown(out)}"
            + (f" --train-paraphrases {next(iter(trained))}" if len(trained) == 1 and trained != {0} else "")
            + (f" --mansu '{next(iter(overrides))}'" if len(overrides) == 1 and overrides != {"{}"} else "")
            + (f" --doc {_shown(doc)}" if doc is not None and doc.resolve() != DOC else ""))


def _shown(path: Path) -> str:
    """`path` relative to the checkout where it lies inside it (as the docs name their commands), else as given."""
    try:
        return str(path.resolve().relative_to(DOC.parents[1]))
    except ValueError:
        return str(path)


def cost_ratios(by_method: dict[str, list[dict]], seed: int | None = 0) -> dict[str, list[float]]:
    """Per split with both runs: MANSU's (seed `seed`; None: every seed's) unlearning time and peak memory over
    GradDiff's (which ran seed 0 alone)."""
    graddiff = {r["job"]["split"]: r for r in by_method.get("graddiff", [])}
    pairs = [(r, graddiff[r["job"]["split"]]) for r in by_method.get("mansu", [])
             if seed in (None, r["job"]["seed"]) and r["job"]["split"] in graddiff]
    return {"time": [m["unlearn_s"] / g["unlearn_s"] for m, g in pairs],
            "memory": [m["peak_mb"] / g["peak_mb"] for m, g in pairs]}


def cad_separation(rows: list[dict]) -> dict[str, float]:
    """How well CAD, and CAD on the NF4 copy, tell runs whose NF4 model forgot (forget accuracy <= the target)
    from runs whose NF4 model remembers: the AUC (1.0: a threshold separates them, 0.5: chance), per measure."""
    out = {}
    for key in ("cad", "cad_nf4"):
        scored = [(r[key], r["forget_nf4"] <= TARGETS["forget_acc"]) for r in rows if r.get(key) is not None]
        held = [v for v, ok in scored if ok]
        lost = [v for v, ok in scored if not ok]
        if held and lost:  # P(a forgetting run's CAD > a remembering run's), ties counted half
            pairs = [(h > x) + 0.5 * (h == x) for h in held for x in lost]
            out[key] = sum(pairs) / len(pairs)
    return out


def label(job: dict[str, Any]) -> str:
    """A run's row name: its method, and its ablation where it has one."""
    return job["method"] + (f" ({job['ablation']})" if job["ablation"] else "")


def split_table(rows: list[dict]) -> list[str]:
    """Per split: MANSU (mean over its seeds), then its ablations, then each baseline, on the numbers the targets
    are stated on."""
    cols = [("forget_full", "forget full"), ("forget_nf4", "forget NF4"), ("forget_bnb_nf4", "forget bnb NF4"),
            ("forget_worst_format", "forget worst fmt"), ("utility_drop_nf4", "utility drop NF4"),
            ("paraphrase_full", "paraphrase"), ("relearn_recovery", "relearn")]
    lines = ["| split | method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    splits = dict.fromkeys(r["job"]["split"] for r in rows)
    for split in splits:
        for name in LABELS:
            group = [r for r in rows if r["job"]["split"] == split and label(r["job"]) == name]
            if group:
                cells = [_mean_spread([r[c] for r in group]) for c, _ in cols]
                lines.append(f"| {split} | {name} ({len(group)}) | " + " | ".join(cells) + " |")
    return lines


def summary_table(by_method: dict[str, list[dict]]) -> list[str]:
    """The short table the README copies: per method, the means of the numbers the targets are stated on."""
    cols = [("forget_full", "forget full"), ("forget_nf4", "forget NF4"), ("forget_bnb_nf4", "forget bnb NF4"),
            ("forget_worst_format", "forget worst format"), ("utility_drop_nf4", "utility drop NF4"),
            ("paraphrase_full", "paraphrase"), ("relearn_recovery", "relearn recovery"), ("unlearn_s", "unlearn s")]
    lines = ["| method (runs) | converged | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for label, group in by_method.items():
        means = [statistics.mean(v) if (v := [r[c] for r in group if r[c] is not None]) else None for c, _ in cols]
        lines.append(f"| {label} ({len(group)}) | {sum(bool(r['converged']) for r in group)} | "
                     + " | ".join("-" if m is None else f"{m:.0f}" if c == "unlearn_s" else f"{m:.2f}"
                                  for m, (c, _) in zip(means, cols)) + " |")
    return lines


def targets_met(mansu_rows: list[dict]) -> str:
    """How many MANSU runs met every target, and with several seeds how many of each seed's."""
    if not mansu_rows:  # a folder of baselines and ablations: nothing to count, and 0 of 0 would read as a result
        return "No MANSU run with the library defaults here: the targets are checked on those runs alone."
    met = sum(not r["failures"] for r in mansu_rows)
    line = (f"MANSU met every target on {met} of {len(mansu_rows)} runs "
            f"({100 * met / len(mansu_rows):.0f}%; the target is 90%).")
    per_seed: dict[int, list[dict]] = {}
    for row in mansu_rows:
        per_seed.setdefault(row["job"]["seed"], []).append(row)
    if len(per_seed) > 1:  # how much of the spread is the seed's
        line += " Per seed: " + ", ".join(f"seed {seed} {sum(not r['failures'] for r in group)} of {len(group)}"
                                          for seed, group in sorted(per_seed.items())) + "."
    return line


def run_time(seconds: float, unlearning: float) -> str:
    """The runs' time on this machine, the unlearning's share, and the wall time of two runs at a time against the
    suite's size in issue #10."""
    return (f"{seconds / 3600:.1f} h of run time on this machine: {unlearning / 3600:.1f} h of it unlearning, the rest "
            f"scoring (before and after, every format, the probes, the certificate, CAD). Two runs at a time "
            f"(`--workers 2`) take at least half of it, {seconds / 7200:.1f} h; issue #10 asks for about "
            f"{SUITE_HOURS:.0f} hours{' (not met)' if seconds / 7200 > 1.25 * SUITE_HOURS else ''}.")


def markdown(by_method: dict[str, list[dict]], mansu_rows: list[dict], command: str, planned: int,
             seconds: float, overrides: list[str]) -> str:
    """The tables of docs/results.md: per method mean ± spread; every MANSU failure listed."""
    cols = ["forget_full", "forget_worst_format", "forget_bnb_nf4", "ptq_gap_max", "utility_drop_full",
            "utility_drop_nf4", "utility_drop_bnb_nf4", "paraphrase_full", "paraphrase_nf4", "generation_recall", "relearn_recovery",
            "cad", "cad_nf4", "unlearn_s", "peak_mb"]
    lines = ["# Durability benchmark results", "",
             f"Generated by `{command}` "
             f"(`report` regenerates this file from the runs). Mean ± spread (population std) over runs.", "",
             "Each run: the embedded SmolLM2-135M (dequantized Q4_1 weights); one split of the bundled fact sets "
             "(`same-D-n`: forget n items of domain D, retain the rest of D; `cross-D-n`: forget n of D, retain 20 "
             "of each of two other domains); utility = up to 20 items of every bundled set the split does not "
             "touch; forget accuracy in full precision, in " + ", ".join(FORMATS) + " (mansu's quantizers) and "
             "through transformers' own bitsandbytes NF4 load; paraphrases and greedy recall of the forget set; "
             "a relearning attack (10 AdamW steps, lr 1e-5, on half of the forget set; `relearn` = accuracy "
             "gained on the other half). Targets (issue #10): " + ", ".join(f"{k} <= {v}" for k, v in TARGETS.items())
             + ", certified (every changed weight flips its NF4 code), relearning recovery below every baseline's. "
             "A MANSU seed changes only the edit's own draws (the retain samples of attribution, of each round's "
             "gradient and of the guard); a split's items, its utility set and the relearning halves are the same "
             "for every seed and method.",
             "", "MANSU's config: the library defaults" + "".join(
                 f", changed by `{o}` ({'some runs' if len(overrides) > 1 else 'every run'})"
                 for o in overrides if o != "{}") + ".", "",
             f"Runs done: {sum(len(g) for g in by_method.values())} of {planned} planned, "
             + run_time(seconds, sum(r["unlearn_s"] for group in by_method.values() for r in group)), "",
             "## Summary (means; the README's table)", "", *summary_table(by_method), "",
             "## Every number, mean ± spread", "",
             "| method | runs | converged | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for label, group in by_method.items():
        converged = sum(bool(r["converged"]) for r in group)
        lines.append(f"| {label} | {len(group)} | {converged} | "
                     + " | ".join(_mean_spread([r[c] for r in group]) for c in cols) + " |")
    ratios = cost_ratios(by_method)
    if ratios["time"]:
        lines += ["", f"MANSU / GradDiff on the same split (median over {len(ratios['time'])} splits; target <= 1.5x): "
                  f"unlearning time {statistics.median(ratios['time']):.2f}x "
                  f"(range {min(ratios['time']):.2f}-{max(ratios['time']):.2f}), peak memory "
                  f"{statistics.median(ratios['memory']):.2f}x (range {min(ratios['memory']):.2f}-{max(ratios['memory']):.2f})."]
    lines += ["", targets_met(mansu_rows)]
    separation = cad_separation([r for group in by_method.values() for r in group])
    if separation:
        lines += ["", "CAD as a test of whether the NF4 model forgot (AUC over every run, 1.0 = a threshold separates "
                  "forgetting from remembering runs, 0.5 = chance): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in separation.items()) + "."]
    lines += ["", "## Per split", "", *split_table([r for group in by_method.values() for r in group]),
              "", "## Every MANSU run that missed a target", ""]
    for row in mansu_rows:
        if row["failures"]:
            lines.append(f"- {row['job']['split']} seed {row['job']['seed']}: " + "; ".join(row["failures"]))
    return "\n".join(lines) + "\n"


def plots(by_method: dict[str, list[dict]], records: list[dict], paths: list[Path]) -> None:
    """Forget accuracy full vs worst quantized format per run, and |update| / NF4 bin width per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import mansu

    # One colour per row name, fixed by the tables' order: a method keeps its colour in both panels and in every
    # folder's plot, whichever methods a folder has.
    colour = {name: f"C{i}" for i, name in enumerate(LABELS)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, group in by_method.items():
        left.scatter([r["forget_full"] for r in group], [r["forget_worst_format"] for r in group], label=label,
                     alpha=0.7, color=colour[label])
    left.plot([0, 1], [0, 1], color="grey", linewidth=1)
    left.set(xlabel="forget accuracy, full precision", ylabel="forget accuracy, worst quantized format",
             title="Above the diagonal: quantization brings knowledge back")
    left.legend(fontsize=7)
    for method in sorted({r["job"]["method"] for r in records}):
        sample = [v for r in records if r["job"]["method"] == method and not r["job"]["ablation"]
                  for v in r["update_ratio_sample"] if v > 0]
        if sample:
            right.hist(np.log10(sample), bins=60, alpha=0.5, density=True, label=method, color=colour[method])
    right.axvline(0, color="black", linestyle="--", linewidth=1)
    right.set(xlabel="log10(|update| / NF4 bin width)", ylabel="density", title="Edit size per changed weight")
    right.legend(fontsize=7)
    fig.tight_layout()
    mark = {"Software": f"{mansu.files.WRITTEN_BY} {mansu.__version__}"}
    for path in paths:
        mansu.files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata=mark))
    plt.close(fig)


def seed_list(text: str) -> tuple[int, ...]:
    """`--seeds`' value, "0,1,2", as seeds; an argparse error naming what is not a seed."""
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers such as 0,1,2, not {text!r}") from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"seeds are >= 0, got {text!r}")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "report", "compare", "job"))
    parser.add_argument("folders", nargs="*", help="compare: run folders, one column each")
    parser.add_argument("--out", default=str(RUNS), help="folder for the runs and results (resumable; default: the "
                        "suite's records, kept in the repository so that a later checkout resumes them)")
    parser.add_argument("--smoke", action="store_true", help="one small split and two methods")
    parser.add_argument("--seeds", type=seed_list, default=(0,),
                        help="compare: comma-separated MANSU seeds to set side by side, e.g. 0,1,2")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (each one thread when > 1)")
    parser.add_argument("--mansu", type=json.loads, default=None, metavar="JSON",
                        help="MansuConfig fields that differ from the defaults, e.g. '{\"backtracks\": 3}'")
    parser.add_argument("--train-paraphrases", type=int, default=0, metavar="N",
                        help="each forget item's first N paraphrases join the forget set (every method); the "
                             "paraphrase probe reads the rest")
    parser.add_argument("--splits", default=None, help="comma-separated split names (default: the whole suite)")
    parser.add_argument("--doc", type=Path, default=DOC,
                        help="run, report: the markdown report to write (default docs/results.md; its plot goes "
                             "next to it as .png)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: one run, as JSON
    args = parser.parse_args()
    out = Path(args.out)
    if args.command == "job":
        run_job(json.loads(args.job), out, args.smoke)
    elif args.command == "compare":
        print(compare([Path(f) for f in args.folders], args.seeds))
    elif args.command == "run":
        run_suite(out, args.smoke, args.workers, args.mansu, args.splits.split(",") if args.splits else None,
                  args.train_paraphrases, args.doc)
    else:
        report(out, args.smoke, None if args.smoke else args.doc)


if __name__ == "__main__":
    main()
