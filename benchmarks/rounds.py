"""Trace MANSU's edit loop on one split of the durability suite: every round's record, then why it stopped.

    python benchmarks/rounds.py same-capitals-10 '{"retain_sample": 32}'
    python benchmarks/rounds.py cross-capitals-20 '{}' --utility-every 2
    python benchmarks/rounds.py cross-capitals-20 '{}' --anchor facts.jsonl

The second argument (optional) is JSON of MansuConfig overrides. With `--utility-every K`, every K-th round
also reads the accuracy of each untouched bundled set (its first 20 items) and of the
forget set's paraphrases, and the end prints both, the forget set in every quantized format, and the untouched
items the edit lost (known before, not after). With
`--anchor FILE` (a JSONL item set), every round also reads the change of those items' answer NLL and of their
mean probability of the true choice, in full precision and NF4: whether a set the edit never sees moves with
the untouched sets.
"""
from __future__ import annotations

import json
import sys

import durability

import mansu
from mansu.probes import paraphrase_items
from mansu.report import default_utility

FORMATS = ("nf4", "nf4-dq", "fp4", "int8", "q4_0", "q8_0")


def main() -> None:
    args = sys.argv[1:]
    every, anchor_file = 0, None
    if "--utility-every" in args:
        at = args.index("--utility-every")
        every = int(args[at + 1])
        del args[at : at + 2]
    if "--anchor" in args:
        at = args.index("--anchor")
        anchor_file = args[at + 1]
        del args[at : at + 2]
    if len(args) not in (1, 2):
        raise SystemExit(__doc__)
    splits = {s.name: s for s in durability.suite()}
    if args[0] not in splits:
        raise SystemExit(f"unknown split {args[0]!r}; one of {', '.join(splits)}")
    overrides = json.loads(args[1]) if len(args) == 2 else {}
    forget, retain = splits[args[0]].items()
    model, tokenizer = mansu.load_model()
    _, names = default_utility(forget, retain)
    utility = {name: mansu.load_bundled(name)[:20] for name in names}

    def correct_now() -> dict[str, list[bool]]:
        """Per untouched set, which of its items the model answers right now."""
        return {n: mansu.evaluate(model, tokenizer, items, progress=False).correct for n, items in utility.items()}

    def probe(correct: dict[str, list[bool]] | None = None) -> str:
        correct = correct or correct_now()
        drops = {n: round(sum(c) / len(c) - before[n], 2) for n, c in correct.items()}
        paraphrase = mansu.evaluate(model, tokenizer, paraphrase_items(forget), progress=False).accuracy
        return f"utility change {drops}, paraphrase {paraphrase:.2f}"

    before_correct = correct_now()
    before = {n: sum(c) / len(c) for n, c in before_correct.items()}
    anchor = mansu.load_items(anchor_file) if anchor_file else None

    def anchor_scores() -> dict[str, float]:
        """The anchor items' answer NLL per token and mean probability of the true choice, full and NF4."""
        out = {}
        for label, m in (("full", model), ("nf4", mansu.quantized_copy(model, "nf4"))):
            r = mansu.evaluate(m, tokenizer, anchor, progress=False)
            out |= {f"nll_{label}": r.answer_nll, f"true_prob_{label}": r.true_prob}
        return out

    anchor_before = anchor_scores() if anchor else None

    def show(record: dict) -> None:
        if anchor:
            record |= {f"anchor_{k}_change": v - anchor_before[k] for k, v in anchor_scores().items()}
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}, flush=True)
        if every and record["round"] % every == 0:
            print(f"  round {record['round']}: {probe()}", flush=True)

    result = mansu.unlearn(model, tokenizer, forget, retain, mansu.MansuConfig(progress=False, **overrides),
                           callback=show)
    print(f"{args[0]} {overrides}: {result.stop_reason}, edited {result.edited:,}, "
          f"timing {({k: round(v, 1) for k, v in result.timing_s.items()})}")
    if every:
        formats = {f: mansu.evaluate(mansu.quantized_copy(model, f), tokenizer, forget, progress=False).accuracy
                   for f in FORMATS}
        after_correct = correct_now()
        print(f"end: {probe(after_correct)}; forget by format {formats}")
        lost = {n: [it.prompt for it, was, now in zip(items, before_correct[n], after_correct[n]) if was and not now]
                for n, items in utility.items()}
        print(f"lost (known before, not after): {({n: p for n, p in lost.items() if p})}")


if __name__ == "__main__":
    main()
