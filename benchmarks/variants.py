"""Which generated rewordings of the forget prompts carry forgetting to held-out paraphrases? (an exploration)

    python benchmarks/variants.py cross-cities-5 drop1,drop2,quoted out.json

MANSU on a durability split whose forget set also holds each item asked in each named rewording, as items of
their own (so, unlike `MansuConfig.forget_variants`, the stop reads them too). Prints and writes the forget set's
accuracy, its held-out paraphrases' and the untouched utility sets', before and after (full precision and NF4).
The library's `forget_variants` came out of these runs (docs/method.md); this script keeps the wordings tried.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import durability  # noqa: E402  (benchmarks/ is not a package)

import mansu  # noqa: E402
from mansu.report import default_utility  # noqa: E402

PREFIXES = {"complete": "Complete the sentence.\n", "noise": "It was a quiet morning in the library. "}


def reworded(item: mansu.Item, kind: str) -> str:
    """`item`'s prompt in one rewording: the library's "quoted" or "fact", a prefix, or its first N words dropped
    ("dropN", kept whole if under N + 3 words, whether or not the dropped words name the fact)."""
    if kind in ("quoted", "fact"):
        return mansu.data.prompt_variants([item], [kind])[0].prompt
    prompt = item.prompt
    if kind in PREFIXES:
        return PREFIXES[kind] + prompt
    n, words = int(kind.removeprefix("drop")), prompt.split(" ")
    return " ".join(words[n:]) if len(words) > n + 2 else prompt


def main(split_name: str, kinds: list[str], out: str) -> None:
    split = {s.name: s for s in durability.suite()}[split_name]
    forget, retain = split.items()
    utility, _ = default_utility(forget, retain, per_set=20)
    train = forget + [mansu.Item(reworded(it, k), it.answer, it.choices) for k in kinds for it in forget]
    paraphrases = [p for it in forget for p in it.paraphrased()]
    model, tokenizer = mansu.load_model()

    def scores(m) -> dict[str, float]:
        return {name: mansu.evaluate(m, tokenizer, items, progress=False).accuracy
                for name, items in (("forget", forget), ("paraphrase", paraphrases), ("utility", utility))}

    before = {"full": scores(model), "nf4": scores(mansu.quantized_copy(model, "nf4"))}
    tick = time.perf_counter()
    result = mansu.unlearn(model, tokenizer, train, retain, mansu.MansuConfig(forget_variants=(), progress=False))
    record = {"split": split_name, "kinds": kinds, "converged": result.converged, "rounds": len(result.rounds),
              "edited": result.edited, "unlearn_s": time.perf_counter() - tick, "before": before,
              "after": {"full": scores(model), "nf4": scores(mansu.quantized_copy(model, "nf4"))}}
    print(json.dumps(record))
    mansu.files.write_json(out, record)


if __name__ == "__main__":
    main(sys.argv[1], [k for k in sys.argv[2].split(",") if k], sys.argv[3])
