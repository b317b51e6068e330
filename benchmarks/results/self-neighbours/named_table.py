"""Neighbours kept in NF4 after MANSU with `relation_neighbours`, split into those the model named itself (so they
were in the retain set) and the rest, next to the library defaults' run on the same split (all its neighbours: its
record has no per-item scores).

    python benchmarks/results/self-neighbours/named_table.py benchmarks/results/self-neighbours/neighbours-20.jsonl

The named prompts are drawn again here as `unlearn` draws them (the unedited model, the suite's retain set with the
protection set, the config's seed): the draw is seeded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import durability  # noqa: E402

import mansu  # noqa: E402
from naming import named_for  # noqa: E402

DEFAULTS = HERE.parent / "durability" / "neighbours" / "mansu.jsonl"


def rows(path: Path) -> dict[str, dict]:
    return {r["split"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def kept(correct: dict[str, list[bool]], prompts: list[str], fmt: int) -> str:
    return f"{sum(correct[p][fmt] for p in prompts) / len(prompts):.2f}" if prompts else "-"


def main() -> None:
    defaults = rows(DEFAULTS)
    model, tokenizer = mansu.load_model()
    splits = {s.name: s for s in durability.suite()}
    print("| split | named (of them neighbours) | defaults, all | named: the named ones / the others / all | rounds | "
          "unlearn s |")
    print("|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        for name, row in rows(Path(path)).items():
            n = row["overrides"]["relation_neighbours"]
            named = {it.prompt for it in named_for(model, tokenizer, splits[name], n)}
            correct = row["neighbours_correct_after"]
            inside = [p for p in correct if p in named]
            outside = [p for p in correct if p not in named]
            cells = " / ".join(kept(correct, group, 1) for group in (inside, outside, list(correct)))
            print(f"| {name} | {len(named)} ({len(inside)}) | {defaults[name]['after']['neighbours']['nf4']:.2f} | "
                  f"{cells} | {row['rounds']} | {row['unlearn_s']:.0f} |")


if __name__ == "__main__":
    main()
