"""Where `mansu.unlearn`'s time goes: cProfile of one 1-round call on the random 135M Llama, quick items.

    python benchmarks/profile_unlearn.py [float32|bfloat16]

Prints `timing_s` and the 30 mansu functions with the most cumulative time (editor setup vs the round).
"""
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (benchmarks/ is not a package)

import mansu  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    dtype = mansu.models.resolve_dtype(sys.argv[1] if len(sys.argv) > 1 else "float32")
    tokenizer = scale.embedded_tokenizer()
    forget, retain = scale.load_items(quick=True)
    model = scale.build(scale.SIZES["135M"], dtype, "cpu")
    config = mansu.MansuConfig(max_rounds=1, target_forget_acc=0.0, progress=False)
    profile = cProfile.Profile()
    profile.enable()
    result = mansu.unlearn(model, tokenizer, forget, retain, config)
    profile.disable()
    print(result.timing_s)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(r"src/mansu/", 30)


if __name__ == "__main__":
    main()
