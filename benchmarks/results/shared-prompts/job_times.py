"""Two folders' runs of the same jobs side by side: whole-job time, unlearning time, and every metric that differs.

    python benchmarks/results/shared-prompts/job_times.py benchmarks/results/shared-prompts/old benchmarks/results/shared-prompts/new
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import durability  # noqa: E402
from mansu.files import read_json  # noqa: E402

TIMES = ("unlearn_s", "peak_mb")  # measured, not scored: they differ from run to run


def main() -> None:
    old, new = (Path(folder) / "runs" for folder in sys.argv[1:3])
    for path in sorted(old.glob("*.json")):
        if not (new / path.name).exists():
            continue
        records = [read_json(path), read_json(new / path.name)]
        scores = [durability.metrics(r) for r in records]
        changed = {k: (scores[0][k], scores[1][k]) for k in scores[0]
                   if k not in TIMES and scores[0][k] != scores[1][k]}
        commits = " -> ".join(commit(r["environment"]) for r in records)
        job, unlearn = ([r["job_s"] for r in records], [r["timing_s"]["unlearn"] for r in records])
        print(f"{path.stem} ({commits}): job {job[0]:.0f} s -> {job[1]:.0f} s ({job[1] / job[0]:.2f}x), "
              f"unlearning {unlearn[0]:.0f} s -> {unlearn[1]:.0f} s; metrics that differ: {changed or 'none'}")


def commit(environment: dict) -> str:
    """The commit a run imported mansu from, with the files under src/ and benchmarks/ changed at the run's end."""
    changed = environment["changed"]
    return environment["commit"][:7] + (f" (changed: {', '.join(changed)})" if changed else "")


if __name__ == "__main__":
    main()
