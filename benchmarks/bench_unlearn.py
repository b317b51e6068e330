"""MANSU vs GradDiff side by side in one run: unlearning time and peak memory ratios (#10's targets: 1.5x each,
as the median over the durability suite; this is the demo split alone).

Runs `mansu demo` (each method in its own process, so each peak is its own) and prints the ratios.
Usage: python benchmarks/bench_unlearn.py [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default="bench-unlearn")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "mansu", "demo", "--out-dir", args.out_dir], check=True)
    mansu, graddiff = (json.loads((Path(args.out_dir) / f"{m}.json").read_text()) for m in ("mansu", "graddiff"))
    time_ratio = mansu["timing_s"]["unlearn"] / graddiff["timing_s"]["unlearn"]
    memory_ratio = mansu["peak_rss_mb_unlearn"] / graddiff["peak_rss_mb_unlearn"]
    print(f"unlearn time:  mansu {mansu['timing_s']['unlearn']:.1f} s, graddiff {graddiff['timing_s']['unlearn']:.1f} s"
          f" -> {time_ratio:.2f}x (target <= 1.5x)")
    print(f"peak memory:   mansu {mansu['peak_rss_mb_unlearn']:.0f} MiB, graddiff {graddiff['peak_rss_mb_unlearn']:.0f} MiB"
          f" -> {memory_ratio:.2f}x (target <= 1.5x)")
    print("mansu stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in mansu["timing_s"].items() if k.startswith("unlearn.")))


if __name__ == "__main__":
    main()
