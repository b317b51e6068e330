"""After MANSU (library defaults, seed 0) on a cross-domain split, what brings the forgotten facts back: the other
half of them, or facts of the same relation the edit never touched? Diagnostic only.

    python benchmarks/results/relearn-exam/rule_attack.py cross-languages-10 cross-cities-5

Each attack is the relearning exam's stand-in (`mansu.probes.sign_attacked`: two signed steps of 1e-4 on every
parameter, down the answers' NLL of five items); each row scores the forget set's held half (the benchmark's
halves, `fact_halves(forget, 0)`) after it. The attackers: the forgotten half the benchmark trains on; five items
of the same relation about other subjects (from the domain's items outside the split, known to the model); five
untouched items of another relation (capitals, or languages for a capitals split); five retain items.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import mansu  # noqa: E402
from durability import suite  # noqa: E402
from mansu.data import encode_items  # noqa: E402
from mansu.probes import fact_halves, sign_attacked  # noqa: E402
from neighbours import neighbours  # noqa: E402

ATTACK_EPS, ATTACK_STEPS, ATTACKERS = 1e-4, 2, 5


def main(names: list[str]) -> None:
    splits = {s.name: s for s in suite()}
    for name in names:
        split = splits[name]
        forget, retain = split.items()
        model, tokenizer = mansu.load_model()
        named = {it.prompt for it in [*forget, *retain]}
        same_relation = neighbours(split, forget, retain)[:ATTACKERS]
        other = "languages" if split.domain == "capitals" else "capitals"
        other_relation = [it for it in mansu.load_bundled(other) if it.prompt not in named][:ATTACKERS]

        def score(items) -> float:
            return mansu.evaluate(model, tokenizer, items, progress=False).accuracy

        before = score(same_relation), score(other_relation)
        result = mansu.unlearn(model, tokenizer, forget, retain, mansu.MansuConfig(progress=False))
        train, held = fact_halves(forget, 0)
        print(f"{name}: {result.stop_reason}, forget {score(forget):.2f}, held half {score(held):.2f} "
              f"({len(held)} items)", flush=True)
        print(f"  the attackers before -> after the edit: same relation {before[0]:.2f} -> "
              f"{score(same_relation):.2f}; other relation {before[1]:.2f} -> {score(other_relation):.2f}", flush=True)
        for label, attackers in (("the forgotten half", train[:ATTACKERS]),
                                 (f"{split.domain}, other subjects", same_relation),
                                 (f"{other}, untouched", other_relation),
                                 ("retain items", retain[:ATTACKERS])):
            attacked = sign_attacked(model, encode_items(tokenizer, attackers), ATTACK_EPS, ATTACK_STEPS)
            held_after = mansu.evaluate(attacked, tokenizer, held, progress=False).accuracy
            print(f"  attack on {label} ({len(attackers)}): held half {held_after:.2f}", flush=True)
            del attacked


if __name__ == "__main__":
    main(sys.argv[1:])
