"""On the cross-domain runs benchmarks/results/combo holds, each option's own run of the same split and seed: every
target met, utility misses, stalls.

    python benchmarks/results/combo/same_runs.py
"""
from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RESULTS.parent))
import durability  # noqa: E402

sys.path.insert(0, str(RESULTS / "self-neighbours"))
from whole_suite import mansu_runs, suite_rows  # noqa: E402

FOLDERS = {"defaults": "durability", "relearn_exam": "relearn-exam/two-steps",
           "relation_neighbours": "self-neighbours/labels", "both": "combo"}


def main() -> None:
    lowest = durability.lowest_baseline_recovery(suite_rows())
    runs = {name: mansu_runs(RESULTS / folder, "cross-", lowest) for name, folder in FOLDERS.items()}
    keys = sorted(runs["both"])
    for name, by_key in runs.items():
        ms = [by_key[k] for k in keys]
        missed = [m["missed"] for m in ms]
        print(f"{name}: every target met on {sum(not x for x in missed)} of {len(ms)} cross runs, utility missed on "
              f"{sum(any(f.startswith('utility') for f in x) for x in missed)}, stalled {sum(not m['converged'] for m in ms)}")


if __name__ == "__main__":
    main()
