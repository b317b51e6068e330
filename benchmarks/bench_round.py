"""Where one MANSU round's time goes on the demo split, and the round's gradients side by side: read from layer
hooks over each circuit tensor's block (`mansu.layer_grads`, what the rounds use) against autograd's whole
weight gradients read at the circuit's entries (what they used before), alternating in one process.

    python benchmarks/bench_round.py [--repeats 5] [--threads 1]

The editor is set up as `mansu.unlearn` sets it up (defaults; the demo's 10 capitals, the rest retained), and
every part runs on that unedited state: the parts of a round are its gradients, the projection of the forget
descent, the proposal, applying the moves (and undoing them), the guard's two retain readings and the forget
set's knowledge in full precision and on the twin. First it prints what a CPU forward costs per padded token
and whatever the tokens (`mansu.evaluation.CPU_FORWARD_TOKENS_PER_THREAD` is their ratio on one thread,
rounded).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch

import mansu
from mansu.attribution import attribute_circuit
from mansu.data import encode_items, with_protection
from mansu.editor import Editor
from mansu.pipeline import _retain_statistics
from mansu.probes import knowledge
from mansu.quant import quantized_weights


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    tick = time.perf_counter()
    out = fn()
    return time.perf_counter() - tick, out


def forward_cost(model: torch.nn.Module, repeats: int) -> None:
    """A forward's fixed cost and its cost per token, from the best of `repeats` forwards of 1 and of 440 tokens."""
    seconds = {}
    with torch.no_grad():
        for rows, width in ((1, 1), (40, 11)):
            ids = torch.randint(100, 1000, (rows, width))
            seconds[rows * width] = min(timed(lambda: model(input_ids=ids).logits.float().log_softmax(-1))[0]
                                        for _ in range(repeats))
    per_token = (seconds[440] - seconds[1]) / 439
    print(f"forward: {seconds[1] * 1e3:.0f} ms whatever the tokens, {per_token * 1e3:.2f} ms per token "
          f"-> a forward is worth {seconds[1] / per_token:.0f} tokens")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = mansu.load_model()
    forward_cost(model, args.repeats)
    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10, seed=0)
    config = mansu.MansuConfig(progress=False)
    retain = with_protection(retain, forget, config.protect)
    layout = quantized_weights(model)
    sample = random.Random(config.seed).sample(list(retain), min(config.attribution_retain, len(retain)))
    circuit = attribute_circuit(model, tokenizer, forget, sample, config.circuit)
    mask = {n: m for n, m in circuit.mask(model).items() if m.any() and n in layout}
    editor = Editor(model, mask, layout, *_retain_statistics(model, tokenizer, retain, mask, config), config)
    print(f"circuit: {editor.circuit_params():,} weights in {len(mask)} tensors; "
          f"{sum(p.numel() for n, p in model.named_parameters() if n in mask):,} in those tensors")

    chunks = editor.chunks(tokenizer, forget)
    batch = encode_items(tokenizer, random.Random(0).sample(list(retain), config.retain_sample))
    layer_hooks = editor._backward

    def autograd_backward(*args, **kwargs):
        """The backward with no layer sites: every circuit tensor takes autograd's gradient (the old path)."""
        hooks, editor.sites = editor.sites, {}
        try:
            return layer_hooks(*args, **kwargs)
        finally:
            editor.sites = hooks

    seconds: dict[str, list[float]] = {}
    worst = 0.0
    for _ in range(args.repeats):
        editor._backward = layer_hooks
        t, (forget_grads, retain_grads, directions, _) = timed(lambda: editor.gradients(chunks, batch, 1))
        seconds.setdefault("gradients (layer hooks)", []).append(t)
        editor._backward = autograd_backward
        t, reference = timed(lambda: editor.gradients(chunks, batch, 1))
        seconds.setdefault("gradients (autograd)", []).append(t)
        for new, old in ((forget_grads, reference[0]), (retain_grads, reference[1])):
            worst = max(worst, max(float((new[n] - old[n]).abs().max() / old[n].abs().max()) for n in old))
        t, _ = timed(lambda: {n: editor.direction(n, g) for n, g in forget_grads.items()})
        seconds.setdefault("projection of the forget descent (in both)", []).append(t)
        t, moves = timed(lambda: editor.propose(forget_grads, retain_grads, directions))
        seconds.setdefault("propose", []).append(t)
        t, _ = timed(lambda: (editor.apply(moves), editor.undo(moves)))
        seconds.setdefault("apply + undo", []).append(t)
        editor.moved = {n: torch.zeros_like(m) for n, m in editor.moved.items()}  # the next repeat starts afresh
        t, _ = timed(lambda: editor.nll(batch))
        seconds.setdefault("guard (retain NLL, full + twin)", []).append(t)
        t, _ = timed(lambda: (knowledge(editor.model, tokenizer, forget), knowledge(editor.quantized, tokenizer, forget)))
        seconds.setdefault("knowledge (full + twin)", []).append(t)

    print(f"\n{'part':<36} {'median s':>9} {'min s':>7}")
    for part, values in seconds.items():
        print(f"{part:<36} {statistics.median(values):>9.2f} {min(values):>7.2f}")
    ratio = statistics.median(seconds["gradients (autograd)"]) / statistics.median(seconds["gradients (layer hooks)"])
    print(f"\ngradients: layer hooks {ratio:.2f}x faster than autograd (medians over {args.repeats} alternating "
          f"repeats); largest difference {worst:.1e} of a tensor's largest entry")


if __name__ == "__main__":
    main()
