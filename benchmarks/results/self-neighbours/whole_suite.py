"""The whole suite with `relation_neighbours=20`: each cross-domain split's MANSU runs from FOLDER, each same-domain
split's from the suite's defaults (benchmarks/results/durability). Those are the same runs: a same-domain split's
retain set asks the forget relation at least 20 times (printed), so `self_neighbours` names nothing and returns
before any draw.

    python benchmarks/results/self-neighbours/whole_suite.py benchmarks/results/self-neighbours/labels
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


def mansu_runs(folder: Path, prefix: str) -> dict[tuple[str, int], dict]:
    """(split, seed) -> metrics of `folder`'s MANSU runs (no ablation) whose split starts with `prefix`."""
    out = {}
    for path in sorted((folder / "runs").glob(f"{prefix}*.mansu.seed*.json")):
        record = mansu.files.read_json(path)
        if not record["job"]["ablation"]:
            out[record["job"]["split"], record["job"]["seed"]] = durability.metrics(record) | {"job": record["job"]}
    return out


def main() -> None:
    folder = Path(sys.argv[1])
    records = map(mansu.files.read_json, (DEFAULTS / "runs").glob("*.json"))
    rows = [{"job": r["job"], **durability.metrics(r)} for r in records]
    lowest, graddiff = durability.lowest_baseline_recovery(rows), [r for r in rows if r["job"]["method"] == "graddiff"]
    defaults = mansu_runs(DEFAULTS, "")
    named = mansu_runs(folder, "cross-")
    for m in [*named.values(), *defaults.values()]:
        m["missed"] = durability.failures(m) + durability.relearn_failure(m, lowest)
    for split in durability.suite():
        forget, retain = split.items()
        mates = relation_mates(forget, with_protection(retain, forget, "general"))
        if not split.name.startswith("cross-"):
            print(f"{split.name}: {len(mates)} retain items ask the forget relation, so nothing is named")
    seeds = sorted({seed for _, seed in named})
    for chosen in [[s] for s in seeds] + ([seeds] if len(seeds) > 1 else []):
        whole = [named.get(key, m) for key, m in sorted(defaults.items()) if key[1] in chosen
                 and (not key[0].startswith("cross-") or key in named)]
        cross = [m for m in whole if m["job"]["split"].startswith("cross-")]
        for name, runs in (("relation_neighbours=20", whole), ("defaults", [defaults[m["job"]["split"], m["job"]["seed"]]
                                                                            for m in whole])):
            print(f"seeds {chosen}, {name}, the whole suite ({len(runs) - len(cross)} same-domain runs from the "
                  f"defaults): {durability._summary(runs, graddiff)}")
        print(f"seeds {chosen}, relation_neighbours=20, cross-domain alone: {durability._summary(cross, graddiff)}")


if __name__ == "__main__":
    main()
