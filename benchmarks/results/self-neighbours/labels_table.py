"""How often a named neighbour's label is the true answer, labelled over the forget set's answers and choices alone
(the first version of `relation_neighbours`) and with the model's greedy answer among them (now), on the named
subjects that a bundled item of the forget domain asks (a label is true when it contains that item's answer, case
aside: "Australian Dollar" for "dollar"); and how many labels the greedy answer changed. The unedited model, each cross
split's seed-0 draw.

    python benchmarks/results/self-neighbours/labels_table.py
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import durability  # noqa: E402

import mansu  # noqa: E402
from mansu.data import Item, load_bundled  # noqa: E402
from mansu.evaluation import choice_scores  # noqa: E402
from mansu.relation import answer_pool  # noqa: E402
from naming import named_for  # noqa: E402


def main() -> None:
    model, tokenizer = mansu.load_model()
    print("| split | named | of them bundled | true label: pool alone / with the greedy answer | labels the greedy "
          "answer changed |")
    print("|---|---|---|---|---|")
    for split in durability.suite():
        if not split.name.startswith("cross-"):
            continue
        forget, _ = split.items()
        named = named_for(model, tokenizer, split, 20)
        pool = answer_pool(forget)
        alone = []
        for it in named:  # the first version's label: the best of the forget set's answers and choices
            scores, _, _ = choice_scores(model, tokenizer, [Item(it.prompt, pool[0], pool)], 256)
            alone.append(pool[int(scores.argsort(descending=True)[0])])  # as self_neighbours ranks
        truth = {it.prompt: it.answer.lower() for it in load_bundled(split.domain)}
        asked = [(old, it) for old, it in zip(alone, named) if it.prompt in truth]
        print(f"| {split.name} | {len(named)} | {len(asked)} | "
              f"{sum(truth[it.prompt] in old.lower() for old, it in asked)} / "
              f"{sum(truth[it.prompt] in it.answer.lower() for _, it in asked)} | "
              f"{sum(old != it.answer for old, it in zip(alone, named))} |")


if __name__ == "__main__":
    main()
