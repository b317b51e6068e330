"""What reading the relearning attack's "before" from the report's own scores saves: `mansu.relearn_attack` on the
embedded model in the durability suite's six formats, measuring its held-out half again (a quantized copy per
format, what `mansu run --relearn` did before) against reading it from per-item scores the report already has
(`known=`), alternating in one process. Prints the times, their ratio, and whether the two results agree.

    python benchmarks/bench_relearn.py [--repeats 2] [--threads 0]
"""
from __future__ import annotations

import statistics
import time

import torch

import mansu
from mansu.report import accuracies

from side_by_side import setup  # benchmarks/, the script's own folder

FORMATS = ("nf4", "nf4-dq", "fp4", "int8", "q4_0", "q8_0")


def main() -> None:
    args, model, tokenizer = setup(__doc__, repeats=2)
    forget = mansu.load_bundled("capitals")[:10]
    scores = accuracies(model, tokenizer, {"forget": forget}, FORMATS, probes=False)  # what `run` scores anyway
    known = {reading: s["forget_correct"] for reading, s in scores.items()}
    times: dict[str, list[float]] = {"measured": [], "read": []}
    results = {}
    for _ in range(args.repeats):
        for way, given in (("measured", None), ("read", known)):
            tick = time.perf_counter()
            results[way] = mansu.relearn_attack(model, tokenizer, forget, FORMATS, progress=False, known=given)
            times[way].append(time.perf_counter() - tick)
    measured, read = (statistics.median(times[w]) for w in ("measured", "read"))
    print(f"threads {torch.get_num_threads()}, {len(forget)} capitals, formats {','.join(FORMATS)}, "
          f"median of {args.repeats}")
    print(f"relearn_attack, before measured again: {measured:.1f} s; read from the report's scores: {read:.1f} s; "
          f"ratio {read / measured:.2f}")
    same = results["measured"].before == results["read"].before and results["measured"].after == results["read"].after
    print(f"before and after agree: {same}")


if __name__ == "__main__":
    main()
