"""What an edit costs the forgotten relation's other subjects: on a cross-domain split of the durability suite, the
forget domain's items in neither the forget nor the retain set ("neighbours": the same relation, asked of subjects
the edit was not told to forget), before and after, in full precision and NF4.

    python benchmarks/neighbours.py cross-cities-5 cross-languages-10 --method graddiff
    python benchmarks/neighbours.py cross-cities-5 --retain-neighbours 5 --out /tmp/cities-k5.jsonl
    python benchmarks/neighbours.py cross-cities-5 --overrides '{"circuit": {"kinds": ["neuron"]}}' --out /tmp/n.jsonl

`--retain-neighbours K` moves K of them (a seeded draw) into the retain set, as a user who adds a few examples of
the forgotten relation would, and scores the rest.

The suite's utility sets leave the forget domain out whole (`mansu.report.default_utility` takes only the bundled
sets that share no prompt with the split), and a cross-domain split retains two other domains, so nothing the
suite's targets read sees these items. Appends one JSON line per split to `--out`; `durability.py report` adds the
suite's (benchmarks/results/durability/neighbours) to docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import durability

import mansu
from mansu.files import atomic_write
from mansu.probes import variants


def neighbours(split: durability.Split, forget, retain) -> list[mansu.Item]:
    """The split's domain items that neither its forget nor its retain set asks."""
    named = {it.prompt.strip() for it in [*forget, *retain]}
    return [it for it in mansu.load_bundled(split.domain) if it.prompt.strip() not in named]


def draw(near: list[mansu.Item], k: int) -> tuple[list[mansu.Item], list[mansu.Item]]:
    """A seeded draw of `k` neighbours to move into the retain set, and the rest, kept to score."""
    drawn = set(random.Random(0).sample(range(len(near)), k))
    return [it for i, it in enumerate(near) if i in drawn], [it for i, it in enumerate(near) if i not in drawn]


def accuracies(model, tokenizer, sets: dict[str, list[mansu.Item]]) -> tuple[dict, dict]:
    """Each set's accuracy in full precision and NF4 (one quantized copy serves every set), and the neighbours'
    per-item correctness {prompt: [full, nf4]}."""
    out: dict[str, dict[str, float]] = {name: {} for name in sets}
    correct: dict[str, list[bool]] = {it.prompt: [] for it in sets["neighbours"]}
    for fmt, scored in variants(model, ("nf4",)):
        for name, items in sets.items():
            result = mansu.evaluate(scored, tokenizer, items, progress=False)
            out[name][fmt] = result.accuracy
            if name == "neighbours":
                for it, ok in zip(items, result.correct):
                    correct[it.prompt].append(ok)
    return out, correct


def measure(split: durability.Split, method: str, retain_neighbours: int = 0, overrides: dict | None = None) -> dict:
    """One split: `method` with the suite's seed-0 config (MANSU's fields changed by `overrides`), its forget set
    and its neighbours before and after; `retain_neighbours` of the neighbours join the retain set and the rest
    are scored."""
    forget, retain = split.items()
    near = neighbours(split, forget, retain)
    if retain_neighbours >= len(near):
        raise SystemExit(f"{split.name} has {len(near)} neighbours: --retain-neighbours {retain_neighbours} "
                         "would leave none to score")
    moved, near = draw(near, retain_neighbours)
    retain = [*retain, *moved]
    model, tokenizer = mansu.load_model()
    sets = {"forget": forget, "neighbours": near} | ({"retained_neighbours": moved} if moved else {})
    before, _ = accuracies(model, tokenizer, sets)
    config = durability.config_for({"split": split.name, "method": method, "seed": 0, "ablation": None,
                                    "overrides": overrides or {}}, False)
    tick = time.perf_counter()
    result = mansu.unlearn(model, tokenizer, forget, retain, config)
    unlearn_s = round(time.perf_counter() - tick, 1)
    after, correct = accuracies(model, tokenizer, sets)
    return {"split": split.name, "method": method, "retain_neighbours": retain_neighbours, "overrides": overrides or {},
            "n_neighbours": len(near), "stop_reason": result.stop_reason, "rounds": len(result.rounds),
            "unlearn_s": unlearn_s, "before": before, "after": after, "neighbours_correct_after": correct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("splits", nargs="+", help="cross-domain split names of the suite")
    parser.add_argument("--method", default="mansu", choices=("mansu", *durability.BASELINES))
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file to append one line per split to "
                        "(default: the suite's, benchmarks/results/durability/neighbours/METHOD.jsonl, which "
                        "`durability.py report` reads)")
    parser.add_argument("--retain-neighbours", type=int, default=0, metavar="K",
                        help="move K neighbours (a seeded draw) into the retain set and score the rest")
    parser.add_argument("--overrides", type=json.loads, default={}, metavar="JSON",
                        help='MansuConfig fields to change, e.g. \'{"relearn_exam": 1e-4}\' (MANSU only)')
    args = parser.parse_args()
    if not isinstance(args.overrides, dict):
        parser.error(f"--overrides must be a JSON object of MansuConfig fields, got {args.overrides!r}")
    if args.overrides and args.method != "mansu":
        parser.error("--overrides changes MansuConfig fields: use it with --method mansu")
    if args.retain_neighbours < 0:
        parser.error(f"--retain-neighbours must be >= 0, got {args.retain_neighbours}")
    splits = {s.name: s for s in durability.suite()}
    unknown = [name for name in args.splits if name not in splits or not splits[name].others]
    if unknown:
        raise SystemExit(f"not cross-domain splits of the suite: {unknown}")
    out = args.out or durability.RUNS / "neighbours" / f"{args.method}.jsonl"
    for name in args.splits:
        row = measure(splits[name], args.method, args.retain_neighbours, args.overrides)
        print(json.dumps(row), flush=True)
        old = out.read_text() if out.exists() else ""
        atomic_write(out, lambda tmp: Path(tmp).write_text(old + json.dumps(row) + "\n"), replace=True)


if __name__ == "__main__":
    main()
