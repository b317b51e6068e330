"""Cost of MANSU's stages next to one GradDiff step, on randomly initialised Llama models of growing size.

    python benchmarks/scale.py [--sizes 135M,360M,1B] [--device cpu|cuda] [--dtype float32|bfloat16]
                               [--out scale.json] [--quick] [--rounds 2] [--threads N]

Random weights cannot measure forgetting; they do measure cost, which depends only on the shapes. Per size,
each of three stages runs in a fresh process on a model built from the same seed, so no stage inherits
another's memory: (1) `attribute_circuit` and then `diagonal_fisher` + `null_space_projector` on its circuit
(peak reset between the two), (2) `mansu.unlearn` with `--rounds` rounds (its whole peak is MANSU's peak),
(3) one GradDiff step: forward + backward + AdamW step on the full model, over the forget set and the retain
set in one batch, which is what MANSU's round gradient also sees (its default retain sample of 64 takes all
59 retain items). Peak memory: CUDA `max_memory_allocated` after `reset_peak_memory_stats`; CPU the process's
peak resident set (VmHWM) after `mansu.report.reset_peak_rss`, both taken once the model is built. Targets,
checked side by side: MANSU's peak <= 1.5x GradDiff's, and its time per round <= 3x one GradDiff step.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import mansu
from mansu.report import peak_rss_mb, reset_peak_rss

# Published shapes: SmolLM2-135M / -360M (HuggingFaceTB), Llama-3.2-1B / -3B, Llama-3.1-8B (meta-llama).
SIZES: dict[str, dict[str, Any]] = {
    "135M": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
    "360M": dict(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49152, tied=True),
    "1B": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "3B": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "8B": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tied=False),
}
MEMORY_TARGET = 1.5  # MANSU peak / GradDiff peak
TIME_TARGET = 3.0  # MANSU seconds per round / one GradDiff step
MANSU = mansu.MansuConfig(progress=False)  # the defaults whose cost is measured


def build(s: dict[str, Any], dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A Llama of shape `s` (a `SIZES` entry) with random weights (seed 0), made directly on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], tie_word_embeddings=s["tied"],
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def embedded_tokenizer():
    """The embedded model's tokenizer, padding as mansu's batches expect."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mansu.models.embedded_model_dir())
    mansu.models.prepare_tokenizer(tokenizer)
    return tokenizer


def load_items(quick: bool) -> tuple[list[mansu.Item], list[mansu.Item]]:
    """The demo split (10 forget capitals, 59 retain); quick mode keeps 4 and 8 of them."""
    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10, seed=0)
    return (forget[:4], retain[:8]) if quick else (forget, retain)


class Meter:
    """Peak memory and wall time of a stage on one device."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        """Reset the peak and the clock."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        self.base_mb = self.peak_mb()
        self.tick = time.perf_counter()

    def peak_mb(self) -> float:
        """Peak since `start`, MiB: allocated CUDA memory, or the process's resident set on CPU."""
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_rss_mb()

    def stop(self) -> dict[str, float]:
        """Seconds, the memory at `start` and the peak since."""
        if self.cuda:
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - self.tick, "base_mb": self.base_mb, "peak_mb": self.peak_mb()}


def stage_circuit(model, tokenizer, forget, retain, meter: Meter, rounds: int) -> dict[str, Any]:
    """Attribution as `unlearn` runs it, then the Fisher and projector on that circuit's quantized weights."""
    from mansu.quant import quantized_weights

    sample = random.Random(MANSU.seed).sample(list(retain), min(MANSU.attribution_retain, len(retain)))
    meter.start()
    circuit = mansu.attribute_circuit(model, tokenizer, forget, sample, MANSU.circuit)
    out = {"attribution": meter.stop(), "circuit_params": circuit.n_params}
    layout = quantized_weights(model)
    mask = {n: m for n, m in circuit.mask(model).items() if m.any() and n in layout}
    meter.start()
    mansu.diagonal_fisher(model, tokenizer, retain, mask, progress=False)
    mansu.null_space_projector(model, tokenizer, retain, mask, mansu.ProjectionConfig(MANSU.energy), progress=False)
    return out | {"fisher_projection": meter.stop()}


def stage_unlearn(model, tokenizer, forget, retain, meter: Meter, rounds: int) -> dict[str, Any]:
    """`mansu.unlearn` for up to `rounds` rounds: a forget target of 0 stops it early only once a random model gets
    every forget item wrong in full precision and NF4."""
    config = mansu.MansuConfig(max_rounds=rounds, target_forget_acc=0.0, progress=False)
    meter.start()
    result = mansu.unlearn(model, tokenizer, forget, retain, config)
    out = meter.stop()
    n = len(result.rounds)
    # The cost of one more round: the median round's own time (the editor's one-off setup, and any circuit
    # growth, are timed apart in timing_s).
    seconds = sorted(r["seconds"] for r in result.rounds)
    return {"unlearn": out, "timing_s": result.timing_s, "rounds": n, "edited": result.edited,
            "stop_reason": result.stop_reason,
            "round_s": seconds[n // 2] if n else None}


def stage_graddiff(model, tokenizer, forget, retain, meter: Meter, rounds: int) -> dict[str, Any]:
    """One GradDiff step through mansu's baseline: forget and all retain items in one batch, AdamW."""
    config = mansu.BaselineConfig(method="graddiff", max_steps=1, eval_every=2, retain_batch_size=len(retain))
    meter.start()
    mansu.unlearn(model, tokenizer, forget, retain, config)
    return {"graddiff_step": meter.stop()}


STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "circuit": stage_circuit, "unlearn": stage_unlearn, "graddiff": stage_graddiff}


def run_stage(args: argparse.Namespace) -> None:
    """Child process: build the model, run one stage, write its numbers to `--result`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = embedded_tokenizer()
    forget, retain = load_items(args.quick)
    model = build(SIZES[args.sizes], mansu.models.resolve_dtype(args.dtype), args.device)
    params = sum(p.numel() for p in model.parameters())
    out = STAGES[args.stage](model, tokenizer, forget, retain, Meter(args.device), args.rounds)
    mansu.files.write_json(args.result, {"params": params, **out})


def measure(size: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every stage of one size, each in its own process; a stage that fails is recorded with its error."""
    out: dict[str, Any] = {"size": size, "shape": SIZES[size]}
    for stage in STAGES:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "stage.json"
            cmd = [sys.executable, __file__, "--stage", stage, "--sizes", size, "--device", args.device,
                   "--dtype", args.dtype, "--rounds", str(args.rounds), "--result", str(result)]
            cmd += ["--quick"] * args.quick + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
            if proc.returncode or not result.exists():
                out.setdefault("errors", {})[stage] = proc.stderr[-2000:] or f"exit {proc.returncode}"
                continue
            out |= mansu.files.read_json(result)
    if "errors" not in out:
        out |= targets(out)
    return out


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The two ratios, measured side by side, and whether each target is met; plus the memory ratio above each
    process's memory before its stage (weights, libraries), which shows what the methods themselves add."""
    u, g = r["unlearn"], r["graddiff_step"]
    memory = u["peak_mb"] / g["peak_mb"]
    timing = ratio(r["round_s"], g["seconds"])
    return {"memory_ratio": memory, "memory_met": memory <= MEMORY_TARGET,
            "memory_ratio_above_base": (u["peak_mb"] - u["base_mb"]) / (g["peak_mb"] - g["base_mb"]),
            "time_ratio": timing, "time_met": timing is not None and timing <= TIME_TARGET}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing."""
    return a / b if a and b else None


def num(x: float | None, spec: str = ".1f") -> str:
    """A table cell: '-' for a missing number."""
    return "-" if x is None else format(x, spec)


def table(results: list[dict[str, Any]]) -> str:
    """One row per size: stage times and peaks, the two ratios, and growth relative to the first size."""
    cols = ["size", "params", "attr s", "attr MiB", "fisher+proj s", "f+p MiB", "rounds", "round s", "unlearn MiB",
            "GD step s", "GD MiB", "mem x", "above base", "time x", "growth: params", "round", "GD step"]
    rows, first = [], next((r for r in results if "errors" not in r), None)
    for r in results:
        if "errors" in r:
            rows.append([r["size"], "failed: " + ", ".join(r["errors"])] + [""] * (len(cols) - 2))
            continue
        a, f, u, g = r["attribution"], r["fisher_projection"], r["unlearn"], r["graddiff_step"]
        r = r | targets(r)  # recomputed, so that --show renders files written before a column was added
        grow = [r["params"] / first["params"], ratio(r["round_s"], first["round_s"]),
                g["seconds"] / first["graddiff_step"]["seconds"]]
        rows.append([r["size"], f"{r['params'] / 1e6:,.0f}M", f"{a['seconds']:.1f}", f"{a['peak_mb']:,.0f}",
                     f"{f['seconds']:.1f}", f"{f['peak_mb']:,.0f}", r["rounds"], num(r["round_s"]),
                     f"{u['peak_mb']:,.0f}", f"{g['seconds']:.1f}", f"{g['peak_mb']:,.0f}",
                     f"{r['memory_ratio']:.2f}" + ("" if r["memory_met"] else " MISSED"),
                     f"{r['memory_ratio_above_base']:.2f}",
                     num(r["time_ratio"], ".2f") + ("" if r["time_met"] else " MISSED")] + [num(x) for x in grow])
    widths = [max(len(str(row[i])) for row in [cols] + rows) for i in range(len(cols))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [cols] + rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135M,360M", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--out", default="scale.json", help="JSON results, written atomically")
    parser.add_argument("--quick", action="store_true", help="4 forget and 8 retain items instead of 10 and 59")
    parser.add_argument("--rounds", type=int, default=2, help="MANSU rounds per size, at most (see stage_unlearn)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--show", metavar="JSON", help="print the table of an earlier --out file and exit")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args)
        return 0
    if args.show:
        print(table(mansu.files.read_json(args.show)["results"]))
        return 0
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    results = []
    for size in sizes:
        results.append(measure(size, args))
        summary = {"device": args.device, "dtype": args.dtype, "quick": args.quick, "rounds": args.rounds,
                   "threads": args.threads or torch.get_num_threads(), "memory_target": MEMORY_TARGET,
                   "time_target": TIME_TARGET, "peak_memory": "cuda max_memory_allocated" if args.device.startswith(
                       "cuda") else "process peak RSS (VmHWM), one process per stage", "results": results}
        mansu.files.write_json(args.out, summary)  # after every size, so a later failure keeps the earlier ones
    print(table(results))
    for r in results:
        for stage, err in r.get("errors", {}).items():
            print(f"{r['size']} {stage} failed:\n{err}", file=sys.stderr)
    return 1 if any("errors" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
