"""The whole suite with `relation_neighbours=20`: each cross-domain split's MANSU runs from CROSS, each same-domain
split's from SAME (default: the suite's defaults, benchmarks/results/durability), set beside the defaults' runs.
SAME's runs stand for runs with the option: a same-domain split's retain set asks the forget relation at least 20
times (printed), so `self_neighbours` names nothing and returns before any draw. With `relearn_exam` too, SAME is
the exam's own folder (benchmarks/results/relearn-exam/two-steps).

    python benchmarks/results/self-neighbours/whole_suite.py benchmarks/results/self-neighbours/labels
    python benchmarks/results/self-neighbours/whole_suite.py benchmarks/results/combo benchmarks/results/relearn-exam/two-steps
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import durability  # noqa: E402

import mansu  # noqa: E402
from mansu.data import relation_mates, with_protection  # noqa: E402

DEFAULTS = HERE.parent / "durability"


def suite_rows() -> list[dict]:
    """Metrics of every run of the suite's defaults (every method), each with its job."""
    records = map(mansu.files.read_json, (DEFAULTS / "runs").glob("*.json"))
    return [{"job": r["job"], **durability.metrics(r)} for r in records]


def mansu_runs(folder: Path, prefix: str, lowest: dict[str, float]) -> dict[tuple[str, int], dict]:
    """(split, seed) -> metrics of `folder`'s MANSU runs (no ablation) whose split starts with `prefix`, with the
    targets each missed ("missed"; relearning against `lowest`, durability.lowest_baseline_recovery)."""
    out = {}
    for path in sorted((folder / "runs").glob(f"{prefix}*.mansu.seed*.json")):
        record = mansu.files.read_json(path)
        if not record["job"]["ablation"]:
            m = durability.metrics(record) | {"job": record["job"]}
            out[record["job"]["split"], record["job"]["seed"]] = m | {
                "missed": durability.missed(m, lowest)}
    return out


def main() -> None:
    cross_folder = Path(sys.argv[1])
    same_folder = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULTS
    rows = suite_rows()
    lowest, graddiff = durability.lowest_baseline_recovery(rows), [r for r in rows if r["job"]["method"] == "graddiff"]
    defaults = mansu_runs(DEFAULTS, "", lowest)
    option = mansu_runs(cross_folder, "cross-", lowest) | mansu_runs(same_folder, "same-", lowest)
    for split in durability.suite():
        if not split.name.startswith("cross-"):
            forget, retain = split.items()
            mates = relation_mates(forget, with_protection(retain, forget, mansu.MansuConfig().protect))
            print(f"{split.name}: {len(mates)} retain items ask the forget relation, so nothing is named")
    name = f"{cross_folder.name} (same-domain runs from {same_folder.name})"
    seeds = sorted({seed for split, seed in option if split.startswith("cross-")})
    for chosen in [[s] for s in seeds] + ([seeds] if len(seeds) > 1 else []):
        keys = [k for k in sorted(defaults) if k[1] in chosen and k in option]
        whole = [option[k] for k in keys]
        cross = [m for m in whole if m["job"]["split"].startswith("cross-")]
        print(f"seeds {chosen}, {name}, the whole suite ({len(whole) - len(cross)} same-domain runs): "
              f"{durability._summary(whole, graddiff)}")
        print(f"seeds {chosen}, defaults, the same runs: {durability._summary([defaults[k] for k in keys], graddiff)}")
        print(f"seeds {chosen}, {cross_folder.name}, cross-domain alone: {durability._summary(cross, graddiff)}")


if __name__ == "__main__":
    main()
