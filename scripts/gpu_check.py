"""One command that checks mansu on a CUDA GPU in under 8 minutes, and writes a JSON summary.

    python scripts/gpu_check.py [--out gpu_check.json]            # on one H100/H200
    python scripts/gpu_check.py --device cpu --quick              # the reduced CPU mode (tests run it)

Parts, each in its own process with its own time budget (killed, and failed, when it runs over):
  device_tests  `pytest -m device` (the tests parametrized over conftest's DEVICES, which holds "cuda" there)
  bnb_codes     mansu's NF4/FP4 codes and block absmax against bitsandbytes' `quantize_4bit` on the device, bit
                for bit: the embedded model's weights and values placed on decision boundaries; fp32/bf16/fp16
  check_kernel  `check`'s fused kernel on a dense edit above its threshold: counts equal to the eager path's
  unlearn       the demo split unlearned in bf16, saved, and loaded through transformers' own 4-bit path
                (`BitsAndBytesConfig`, nf4): its forget/retain accuracy next to mansu's own NF4 evaluation
  scale         benchmarks/scale.py at 1B and 8B; its memory and time targets
The CPU mode (`--device cpu --quick`) runs all but device_tests, reduced: a few weights, the fused kernel at a
tiny size (threshold lowered), a 1-round unlearn of a tiny random Llama, and scale at 135M on 4+8 items, whose
targets are reported but not enforced (so few items measure nothing at scale). Exits 1 if a part fails.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import mansu
from mansu.report import accuracies

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale  # noqa: E402  (benchmarks/ is not a package)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Seconds per part: full mode on one H100/H200 (7:50 in all; estimates, since no GPU has run this yet: set them
# from the first run's JSON), and the CPU mode, where they only guard against a hang (shared CPUs vary 3x in speed).
BUDGETS = {"device_tests": (50, 600), "bnb_codes": (35, 600), "check_kernel": (75, 600), "unlearn": (110, 600),
           "scale": (200, 600)}
QUICK_PARTS = ("bnb_codes", "check_kernel", "unlearn", "scale")  # the CPU mode leaves the test suite to pytest
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, tied=True)  # vocab: the tokenizer's


def packed_codes(w: torch.Tensor, qt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mansu's codes for `w`, mapped to the library's code numbers and packed two per byte (first element in the
    high nibble) as bitsandbytes stores them; and the block absmax."""
    from mansu import quant

    fmt = quant.get_format(qt)
    enc = quant.encode(w, qt)
    codes = enc.codes.reshape(-1)[: w.numel()].long()
    if fmt.library_codes:
        codes = torch.tensor(fmt.library_codes, device=codes.device)[codes]
    return (codes[0::2] << 4 | codes[1::2]).to(torch.uint8), enc.scale


def on_boundaries(qt: str, dtype: torch.dtype, device: str, blocks: int = 64) -> torch.Tensor:
    """Random blocks whose first weight is the block absmax and whose next 15 sit on the 15 decision boundaries."""
    from mansu import quant

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(blocks, 64, generator=gen) * 0.05
    absmax = w.abs().amax(1, keepdim=True)
    w[:, :1] = absmax
    w[:, 1:16] = quant.get_format(qt).midpoints() * absmax
    return w.to(dtype).to(device)


def part_bnb_codes(device: str, quick: bool) -> dict[str, Any]:
    """Codes and absmax equal to bitsandbytes' `quantize_4bit` on `device`, tensor by tensor."""
    import bitsandbytes.functional as bnbf
    from mansu.quant import quantized_weights

    model, _ = mansu.load_model()
    names = list(quantized_weights(model))[: 3 if quick else None]
    weights = {n: model.get_parameter(n).detach() for n in names}
    compared, mismatches = 0, []
    for qt in ("nf4", "fp4"):
        for dtype in DTYPES:
            cases = {f"boundaries/{qt}": on_boundaries(qt, dtype, device)}
            cases |= {n: w.to(device, dtype) for n, w in weights.items()}
            for name, w in cases.items():
                packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=qt)
                ours, absmax = packed_codes(w, qt)
                compared += 1
                if not (torch.equal(ours.cpu(), packed.view(-1).cpu()) and torch.equal(absmax.cpu(), state.absmax.cpu())):
                    mismatches.append(f"{name} {qt} {dtype}")
    return {"ok": compared > 0 and not mismatches, "compared": compared, "mismatches": mismatches[:20]}


def part_check_kernel(device: str, quick: bool) -> dict[str, Any]:
    """`check` of a dense edit counted by the fused kernel, then eagerly (threshold raised): equal counts."""
    from mansu import quant

    owner = sys.modules[quant.check.__module__]  # where check reads its threshold and keeps the compiled kernel
    blocks = 300 if quick else owner._FUSED_MIN_BLOCKS + 4096
    if quick:
        owner._FUSED_MIN_BLOCKS = 64
    out: dict[str, Any] = {"blocks": blocks, "ok": True}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(2)
        before = (torch.randn(blocks, 64, generator=gen, device=device) * 0.05).to(dtype)
        after = (before.float() + 1e-3 * torch.randn(before.shape, generator=gen, device=device)).to(dtype)
        after[: min(blocks, 64)] = on_boundaries("nf4", dtype, device, min(blocks, 64))
        counts = {}
        for path, threshold in (("fused", owner._FUSED_MIN_BLOCKS), ("eager", blocks + 1)):
            saved, owner._FUSED_MIN_BLOCKS = owner._FUSED_MIN_BLOCKS, threshold
            tick = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # an eager fallback of the fused path fails here
                c = quant.check({"w": before}, {"w": after}, ["nf4", "fp4"], layout={"w": False})
            owner._FUSED_MIN_BLOCKS = saved
            counts[path] = {qt: [c[qt].changed, c[qt].flipped, c[qt].collateral] for qt in ("nf4", "fp4")}
            counts[path + "_s"] = time.perf_counter() - tick
        compiled = owner._fused_kernel not in (None, owner._absmax_counts)
        out[str(dtype).removeprefix("torch.")] = counts | {"compiled": compiled}
        out["ok"] &= compiled and counts["fused"] == counts["eager"] and counts["fused"]["nf4"][1] > 0
    return out


def part_unlearn(device: str, quick: bool) -> dict[str, Any]:
    """Unlearn in bf16 on `device`, save, load through transformers' 4-bit path, compare with mansu's NF4."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10, seed=0)
    if quick:
        tokenizer = scale.embedded_tokenizer()
        model = scale.build(TINY | {"vocab": len(tokenizer)}, torch.bfloat16, device)
        forget, retain = forget[:4], retain[:8]
        config = mansu.MansuConfig(max_rounds=1, edits_per_round=500, progress=False)
    else:
        model, tokenizer = mansu.load_model(dtype=torch.bfloat16, device=device)
        config = mansu.MansuConfig(progress=False)
    result = mansu.unlearn(model, tokenizer, forget, retain, config)
    sets = {"forget": forget, "retain": retain}
    ours = accuracies(model, tokenizer, sets, ["nf4"], probes=False)  # full precision and mansu's own NF4 copy
    with tempfile.TemporaryDirectory() as tmp:
        mansu.save_model(model, tokenizer, tmp)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quantization, device_map=device).eval()
    for module in loaded.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU bf16 speed path is not the format
    theirs = accuracies(loaded, tokenizer, sets, [], probes=False)["full"]
    agree = all(ours["nf4"][k] == theirs[k] for k in ("forget_acc", "retain_acc"))
    prob_gap = max(abs(ours["nf4"][k] - theirs[k]) for k in ("forget_true_prob", "retain_true_prob"))
    certified = bool(result.certificate and result.certificate.certified)
    ok = agree and certified and (quick or result.converged)  # a 1-round tiny random model need not converge
    return {"ok": ok, "certified": certified, "converged": result.converged, "rounds": len(result.rounds),
            "edited": result.edited, "true_prob_gap": prob_gap, "full": ours["full"], "mansu_nf4": ours["nf4"],
            "transformers_4bit": theirs, "timing_s": result.timing_s}


def part_scale(device: str, quick: bool) -> dict[str, Any]:
    """benchmarks/scale.py as its own command; on the GPU its targets must be met."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scale.json"
        args = ["--sizes", "135M", "--quick", "--rounds", "1"] if quick else [
            "--sizes", "1B,8B", "--dtype", "bfloat16"]
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--device", device,
                               "--out", str(out), *args], capture_output=True, text=True)
        results = mansu.files.read_json(out)["results"] if out.exists() else []
    measured = proc.returncode == 0 and len(results) > 0 and all("errors" not in r for r in results)
    met = measured and all(r["memory_met"] and r["time_met"] for r in results)
    return {"ok": measured and (quick or met), "targets_met": met, "table": proc.stdout,
            "stderr": proc.stderr[-2000:] if proc.returncode else "", "results": results}


def part_device_tests(device: str, quick: bool) -> dict[str, Any]:
    """`pytest -m device`; no collected test (exit 5) is a failure: then nothing was checked."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "device", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    return {"ok": proc.returncode == 0, "exit": proc.returncode, "tail": proc.stdout[-3000:]}


PARTS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "device_tests": part_device_tests, "bnb_codes": part_bnb_codes, "check_kernel": part_check_kernel,
    "unlearn": part_unlearn, "scale": part_scale}


def run_part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One part in its own process group, killed with its children when it runs past its budget."""
    budget = BUDGETS[name][args.quick]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part", name, "--device", args.device, "--result", str(result)]
        tick = time.perf_counter()
        proc = subprocess.Popen(cmd + ["--quick"] * args.quick, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env=os.environ | {"TQDM_DISABLE": "1"})
        try:
            log, _ = proc.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        seconds = time.perf_counter() - tick
        out = mansu.files.read_json(result) if result.exists() else {"ok": False, "log": log[-3000:]}
    if seconds > budget:
        out |= {"ok": False, "error": f"over its budget of {budget} s"}
    return {"seconds": round(seconds, 1), "budget_s": budget} | out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the reduced mode (meant for --device cpu)")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        mansu.files.write_json(args.result, PARTS[args.part](args.device, args.quick))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; the CPU mode is --device cpu --quick")
    parts = args.parts.split(",") if args.parts else list(QUICK_PARTS if args.quick else PARTS)
    summary: dict[str, Any] = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                               "parts": {}}
    for name in parts:
        summary["parts"][name] = report = run_part(name, args)
        print(f"{name:<13} {'ok' if report['ok'] else 'FAILED':<7} {report['seconds']:>6.1f} s "
              f"(budget {report['budget_s']} s)", flush=True)
    summary["ok"] = all(p["ok"] for p in summary["parts"].values())
    mansu.files.write_json(args.out, summary)
    print(f"{'all ok' if summary['ok'] else 'FAILED'}; summary in {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
