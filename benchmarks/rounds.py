"""Trace MANSU's edit loop on one split of the durability suite: every round's record, then why it stopped.

    python benchmarks/rounds.py same-capitals-10 '{"retain_sample": 32}'

The second argument (optional) is JSON of MansuConfig overrides.
"""
from __future__ import annotations

import json
import sys

import durability

import mansu


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    splits = {s.name: s for s in durability.suite()}
    if sys.argv[1] not in splits:
        raise SystemExit(f"unknown split {sys.argv[1]!r}; one of {', '.join(splits)}")
    overrides = json.loads(sys.argv[2]) if len(sys.argv) == 3 else {}
    forget, retain = splits[sys.argv[1]].items()
    model, tokenizer = mansu.load_model()
    result = mansu.unlearn(model, tokenizer, forget, retain, mansu.MansuConfig(progress=False, **overrides))
    for record in result.rounds:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}, flush=True)
    print(f"{sys.argv[1]} {overrides}: {result.stop_reason}, edited {result.edited:,}, "
          f"timing {({k: round(v, 1) for k, v in result.timing_s.items()})}")


if __name__ == "__main__":
    main()
