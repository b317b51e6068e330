"""Time `mansu.quant.check` on the embedded model against bitsandbytes quantizing the same weights once.

    python benchmarks/bench_check.py [--repeats 3] [--format nf4] [--dtype float32]

Side by side in one run (best of --repeats, to ride out a busy machine): a memory copy of the quantized
weights, bitsandbytes `quantize_4bit` over all of them, `check` of a dense edit (every weight changed)
and of a sparse edit (two rows of every quantized matrix, < 1% of the weights). Targets: dense <= 1x and
sparse <= 0.2x the bitsandbytes time. The first dense check of a process also compiles mansu's fused
kernel (torch.compile; inductor caches it on disk, so a cold cache costs more): it is shown on its own row.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import mansu
from mansu import quant


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", default="nf4")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    model, _ = mansu.load_model()
    layout = quant.quantized_weights(model)
    dtype = getattr(torch, args.dtype)
    before = {k: v.to(dtype) for k, v in model.state_dict().items() if k in layout}
    n = sum(v.numel() for v in before.values())
    gen = torch.Generator().manual_seed(0)
    dense = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in before.items()}
    sparse = {k: v.clone() for k, v in before.items()}
    for v in sparse.values():
        v[:2] += 1e-2  # two output rows per matrix, as a circuit edit touches a few heads/neurons
    n_dense, n_sparse = (sum(int((edit[k] != before[k]).sum()) for k in before) for edit in (dense, sparse))
    qt = args.format.removesuffix("-dq")

    t_copy = best_of(lambda: [v.clone() for v in before.values()], args.repeats)
    t_bnb = best_of(lambda: [bnbf.quantize_4bit(v, blocksize=64, quant_type=qt) for v in before.values()], args.repeats)
    t_first = best_of(lambda: quant.check(before, dense, args.format, layout=layout), 1)
    t_dense = best_of(lambda: quant.check(before, dense, args.format, layout=layout), args.repeats)
    t_sparse = best_of(lambda: quant.check(before, sparse, args.format, layout=layout), args.repeats)

    print(f"{len(layout)} quantized weights, {n / 1e6:.1f}M values, {args.dtype}; threads {torch.get_num_threads()}; "
          f"format {args.format}")
    print(f"{'what':<36} {'seconds':>8} {'x bnb':>7}")
    for what, t in [("memory copy", t_copy), (f"bitsandbytes quantize_4bit ({qt})", t_bnb),
                    ("check, dense edit, first call", t_first),
                    (f"check, dense edit ({100 * n_dense / n:.2f}% changed)", t_dense),
                    (f"check, sparse edit ({100 * n_sparse / n:.2f}% changed)", t_sparse)]:
        print(f"{what:<36} {t:>8.3f} {t / t_bnb:>7.2f}")
    print(f"targets: dense <= 1.00x ({'met' if t_dense <= t_bnb else 'MISSED'}), "
          f"sparse <= 0.20x ({'met' if t_sparse <= 0.2 * t_bnb else 'MISSED'})")


if __name__ == "__main__":
    main()
