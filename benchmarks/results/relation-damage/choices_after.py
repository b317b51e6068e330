"""Which choice wins on cross-languages-10's forget items and neighbours after MANSU (seed 0), five neighbours in
the retain set as `neighbours.py --retain-neighbours 5` draws them, and each choice's answer log-prob before > after.
A winner among the forget items' wrong choices is tagged "forgetdistractor", one among their answers
"forgetanswer".

    python benchmarks/results/relation-damage/choices_after.py > benchmarks/results/relation-damage/choices-defaults.txt
    git apply benchmarks/results/relation-damage/capped.diff
    python benchmarks/results/relation-damage/choices_after.py '{"forget_on": "choices_capped"}' > benchmarks/results/relation-damage/choices-capped.txt
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import durability  # noqa: E402
import neighbours as nb  # noqa: E402

import mansu  # noqa: E402
from mansu.data import encode  # noqa: E402
from mansu.evaluation import answer_logprob  # noqa: E402


@torch.no_grad()
def choice_scores(model, tokenizer, items: list[mansu.Item]) -> list[list[float]]:
    """Per item, each choice's summed answer log-prob."""
    return [answer_logprob(model, encode(tokenizer, [it.prompt] * len(it.choices), list(it.choices))).tolist()
            for it in items]


def main() -> None:
    overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    split = {s.name: s for s in durability.suite()}["cross-languages-10"]
    forget, retain = split.items()
    near = nb.neighbours(split, forget, retain)
    moved, held = nb.draw(near, 5)
    sets = {"moved into retain": moved, "held": held, "forget": forget}
    model, tokenizer = mansu.load_model()
    before = {name: choice_scores(model, tokenizer, items) for name, items in sets.items()}
    config = durability.config_for({"split": split.name, "method": "mansu", "seed": 0, "ablation": None}, False)
    config = dataclasses.replace(config, **overrides)
    mansu.unlearn(model, tokenizer, forget, [*retain, *moved], config)
    wrong = {c for it in forget for c in it.choices if c != it.answer}
    answers = {it.answer for it in forget}
    print(f"overrides: {json.dumps(overrides)}")
    for name, items in sets.items():
        after = choice_scores(model, tokenizer, items)
        print(f"== {name}: {sum(it.choices[a.index(max(a))] == it.answer for it, a in zip(items, after))} of "
              f"{len(items)} right after")
        for it, b, a in zip(items, before[name], after):
            win = it.choices[a.index(max(a))]
            tag = "forgetdistractor" if win in wrong else "forgetanswer" if win in answers else ""
            shifts = " ".join(f"{c}:{x:.1f}>{y:.1f}" for c, x, y in zip(it.choices, b, a))
            print(f"  {it.prompt:<45} {it.answer:<11} -> {win:<11} {tag:<16} {shifts}")


if __name__ == "__main__":
    main()
