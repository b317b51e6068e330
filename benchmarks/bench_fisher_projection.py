"""Time, memory and accuracy of the retain Fisher and the null-space projector on the embedded model.

    python benchmarks/bench_fisher_projection.py            # every phase, each in a fresh process
    python benchmarks/bench_fisher_projection.py --phase fisher
    python benchmarks/bench_fisher_projection.py --phases fisher fisher_one_by_one   # the side-by-side alone

`fisher` reads every item's gradient from batched backwards (mansu.layer_grads); `fisher_one_by_one` is the same
Fisher with one item per backward: the run prints the two side by side.

The circuit is random heads and neurons of realistic size (5% of heads, 1% of neurons by default).
Memory is the peak resident set sampled every 5 ms above the resident set after loading the model:
torch's CPU allocator bypasses Python's, so tracemalloc would not see the tensors.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import torch

import mansu
from mansu.data import batches
from mansu.evaluation import answer_logprob
from mansu.fisher import FisherConfig, diagonal_fisher, full_mask
from mansu.projection import ProjectionConfig, null_space_projector

PHASES = ("fisher", "fisher_one_by_one", "fisher_true", "fisher_all", "projection", "bound")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@contextmanager
def peak_rss(out: dict):
    """Record wall time and the peak resident set above the starting one (MiB) into `out`."""
    start, peak, done = rss_mb(), [rss_mb()], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 2)
        done.set()
        thread.join()
        out["peak_extra_mib"] = round(max(peak[0], rss_mb()) - start, 1)


def random_circuit_mask(model, head_frac: float = 0.05, neuron_frac: float = 0.01, seed: int = 0):
    """Random heads (q rows, the KV head's k/v rows, o columns) and neurons (gate/up rows, down column)."""
    cfg = model.config
    n_layers, n_heads, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    d_head, ffn = cfg.hidden_size // n_heads, cfg.intermediate_size
    g = torch.Generator().manual_seed(seed)
    heads = torch.randperm(n_layers * n_heads, generator=g)[: round(head_frac * n_layers * n_heads)]
    neurons = torch.randperm(n_layers * ffn, generator=g)[: round(neuron_frac * n_layers * ffn)]
    params = dict(model.named_parameters())
    mask: dict[str, torch.Tensor] = {}

    def select(layer: int, module: str, index: slice, rows: bool) -> None:
        name = f"model.layers.{layer}.{module}.weight"
        m = mask.setdefault(name, torch.zeros_like(params[name], dtype=torch.bool))
        if rows:
            m[index] = True
        else:
            m[:, index] = True

    for h in heads.tolist():
        layer, head = divmod(h, n_heads)
        kv = head // (n_heads // n_kv)
        select(layer, "self_attn.q_proj", slice(head * d_head, (head + 1) * d_head), rows=True)
        for proj in ("k_proj", "v_proj"):
            select(layer, f"self_attn.{proj}", slice(kv * d_head, (kv + 1) * d_head), rows=True)
        select(layer, "self_attn.o_proj", slice(head * d_head, (head + 1) * d_head), rows=False)
    for n in neurons.tolist():
        layer, neuron = divmod(n, ffn)
        for proj in ("gate_proj", "up_proj"):
            select(layer, f"mlp.{proj}", slice(neuron, neuron + 1), rows=True)
        select(layer, "mlp.down_proj", slice(neuron, neuron + 1), rows=False)
    return mask


def retain_nll(model, tok, items, delta) -> float:
    """Mean retain answer NLL with `delta` added to the weights (restored afterwards)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in delta.items():
            params[n].add_(d)
        value = -answer_logprob(model, next(batches(tok, items, len(items)))).double().mean().item()
        for n, d in delta.items():
            params[n].sub_(d)
    return value


def bound_accuracy(model, tok, retain, mask, scales=(0.01, 0.03, 0.1), trials=3) -> list[dict]:
    """Measured retain NLL change of random circuit updates, raw and projected, vs the Fisher estimates.

    Runs in float64 so that changes of 1e-6 nats are not float32 rounding noise; the symmetric second
    difference (L(+d) + L(-d)) / 2 - L(0) isolates the curvature term that the bound estimates.
    """
    model = model.double()
    fisher = diagonal_fisher(model, tok, retain, mask, progress=False)
    projector = null_space_projector(model, tok, retain, mask, progress=False)
    params, base, rows = dict(model.named_parameters()), retain_nll(model, tok, retain, {}), []
    g = torch.Generator().manual_seed(1)
    for scale in scales:
        for _ in range(trials):
            # Relative to each weight matrix's mean |w|: the size of an NF4 bin is about 0.1-0.2 of that.
            d = {n: torch.randn(m.shape, generator=g, dtype=torch.float64) * m * scale * params[n].abs().mean()
                 for n, m in mask.items()}
            for kind, delta in (("raw", d), ("projected", projector.apply(d))):
                plus = retain_nll(model, tok, retain, delta) - base
                minus = retain_nll(model, tok, retain, {n: -v for n, v in delta.items()}) - base
                rows.append({"update": kind, "scale": scale, "bound": fisher.cost(delta),
                             "curvature": (plus + minus) / 2, "measured": plus,
                             "predicted": fisher.predicted_change(delta)})
    return rows


def run_phase(phase: str, n_retain: int) -> dict:
    torch.set_num_threads(1)  # on a shared 2-core machine, OpenMP spinning made 2 threads 30x slower
    model, tok = mansu.load_model()
    retain = mansu.load_bundled("capitals")[:n_retain]
    mask = random_circuit_mask(model)
    total = sum(p.numel() for p in model.parameters())
    out = {"phase": phase, "retain_items": len(retain), "circuit_entries": int(sum(m.sum() for m in mask.values())),
           "circuit_fraction": round(float(sum(m.sum() for m in mask.values())) / total, 5),
           "weights_touched": len(mask)}
    if phase == "bound":
        out["rows"] = bound_accuracy(model, tok, retain, mask)
        return out
    # The weights are memory-mapped until first read: page them in so they do not count as the phase's memory.
    retain_nll(model, tok, retain, {})
    with peak_rss(out):
        if phase == "projection":
            result = null_space_projector(model, tok, retain, mask, ProjectionConfig(), progress=False)
            out["result"] = result.summary()
            out["largest_eigenproblem"] = max(p.columns.numel() for p in result.layers.values())
        else:
            kind = "true" if phase == "fisher_true" else "empirical"
            config = FisherConfig(kind=kind, batch_size=1 if phase == "fisher_one_by_one" else 16)
            result = diagonal_fisher(model, tok, retain, full_mask(model) if phase == "fisher_all" else mask,
                                     config, progress=False)
            out["result"] = result.summary()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=PHASES, help="run this phase in this process and print its JSON")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=PHASES, help="phases to run (fresh processes)")
    parser.add_argument("--retain", type=int, default=30, help="capitals used as the retain set")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.retain)))
        return
    runs = {}
    for phase in args.phases:  # a fresh process each, so one phase's memory does not hide another's
        n = 8 if phase == "fisher_all" else args.retain
        cmd = [sys.executable, __file__, "--phase", phase, "--retain", str(n)]
        runs[phase] = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(runs[phase])
    if not {"fisher", "fisher_one_by_one"} <= set(runs):
        return
    batched, one = (json.loads(runs[p]) for p in ("fisher", "fisher_one_by_one"))
    print(f"fisher, batched vs one item per backward: {batched['seconds']} s vs {one['seconds']} s -> "
          f"{one['seconds'] / batched['seconds']:.1f}x faster; peak extra RSS {batched['peak_extra_mib']} vs "
          f"{one['peak_extra_mib']} MiB")


if __name__ == "__main__":
    main()
