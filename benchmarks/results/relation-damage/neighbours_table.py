"""The forgotten relation's other subjects (`benchmarks/neighbours.py`) after MANSU with changed configs, beside the
library defaults' records with the same number of them in the retain set (K = 0:
benchmarks/results/durability/neighbours/mansu.jsonl; K = 5: benchmarks/results/neighbours-in-retain/mansu.jsonl).
Cells are full precision / NF4; each file's columns are named by it (its records keep the overrides they ran with).

    python benchmarks/results/relation-damage/neighbours_table.py benchmarks/results/relation-damage/capped-neighbours.jsonl benchmarks/results/relation-damage/neurons-neighbours.jsonl
    python benchmarks/results/relation-damage/neighbours_table.py benchmarks/results/relation-damage/retain-choices-neighbours.jsonl
"""
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parents[1]
DEFAULTS = {0: RESULTS / "durability" / "neighbours" / "mansu.jsonl", 5: RESULTS / "neighbours-in-retain" / "mansu.jsonl"}


def rows(path: Path, k: int | None = None) -> dict[str, dict]:
    """A records file's rows by split (those with `k` neighbours in the retain set, when given)."""
    records = map(json.loads, path.read_text().splitlines())
    return {r["split"]: r for r in records if k is None or r.get("retain_neighbours", 0) == k}


def cell(r: dict) -> str:
    a = r["after"]
    kept = a.get("retained_neighbours")
    return (f"{a['forget']['full']:.2f} / {a['forget']['nf4']:.2f} | {a['neighbours']['full']:.2f} / "
            f"{a['neighbours']['nf4']:.2f} | " + (f"{kept['full']:.2f} / {kept['nf4']:.2f} | " if kept else "- | ")
            + f"{r['stop_reason']}, {r['unlearn_s']:.0f} s")


def main() -> None:
    given = {Path(name).stem.removesuffix("-neighbours"): rows(Path(name)) for name in sys.argv[1:]}
    (k,) = {r.get("retain_neighbours", 0) for records in given.values() for r in records.values()}
    runs = {"defaults": rows(DEFAULTS[k], k)} | given
    splits = sorted(set.intersection(*(set(r) for r in runs.values())))
    print(f"{k} neighbours in the retain set; columns per run: forget, held neighbours, neighbours in the retain "
          "set, stop\n")
    print("| split (held neighbours) | " + " | ".join(f"{n} | | |" for n in runs) + " |")
    print("|---" * (1 + 4 * len(runs)) + "|")
    for split in splits:
        print(f"| {split} ({runs['defaults'][split]['n_neighbours']}) | "
              + " | ".join(cell(r[split]) for r in runs.values()) + " |")
    for label, records in runs.items():
        held = [records[s]["after"]["neighbours"]["nf4"] for s in splits]
        print(f"- {label}: held neighbours in NF4 {sum(held) / len(held):.2f} on average over {len(splits)} splits")


if __name__ == "__main__":
    main()
