"""The table of docs/method.md's "Facts of the forgotten relation in the retain set": for each run that moved K
neighbours into the retain set, the held neighbours, the moved ones and the forget set after it, next to the same
method's run without (K = 0) scored on the same held items.

    python benchmarks/results/neighbours-in-retain/table.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
BASELINE = {"mates-draw": "mansu"}  # the mates draw is the plain draw when no retain item asks the relation


def runs(name: str) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]
    return {(r["split"], r["retain_neighbours"]): r for r in rows}


def pair(acc: dict) -> str:
    return f"{acc['full']:.2f} / {acc['nf4']:.2f}"


def main() -> None:
    print("| run | split | K | held (n) | the same items without (K = 0) | moved into retain | forget | stop |")
    print("|---|---|---|---|---|---|---|---|")
    means = []
    for name in ("mansu", "mates-draw", "graddiff"):
        if not (HERE / f"{name}.jsonl").exists():
            continue
        own, base = runs(name), runs(BASELINE.get(name, name))
        nf4: dict[tuple[int, bool], list[tuple[float, float]]] = {}
        for (split, k), r in sorted(own.items(), key=lambda kv: (kv[0][1] > 5, kv[0])):
            if k == 0:
                continue
            held = r["neighbours_correct_after"]
            without = base[split, 0]["neighbours_correct_after"]
            was = [sum(without[p][i] for p in held) / len(held) for i in (0, 1)]
            moved = pair(r["after"]["retained_neighbours"]) if "retained_neighbours" in r["after"] else "not scored"
            print(f"| {name} | {split} | {k} | {pair(r['after']['neighbours'])} ({len(held)}) | "
                  f"{was[0]:.2f} / {was[1]:.2f} | {moved} | {pair(r['after']['forget'])} | {r['stop_reason']} |")
            for converged in {False, r["stop_reason"] == "converged"}:
                nf4.setdefault((k == 5, converged), []).append((r["after"]["neighbours"]["nf4"], was[1]))
        for (five, converged), pairs in sorted(nf4.items()):
            with_, without_ = (sum(x) / len(pairs) for x in zip(*pairs))
            means.append(f"{name}, K {'= 5' if five else '> 5'}, {'converged runs' if converged else 'all runs'} "
                         f"({len(pairs)}): held neighbours in NF4 {with_:.2f}, the same items without {without_:.2f}")
    print("\nMeans:\n" + "\n".join(f"- {line}" for line in means))


if __name__ == "__main__":
    main()
