"""What projecting only the answer positions onto the vocabulary saves: `mansu.evaluate` and one forward +
backward of the answer log-likelihood on the embedded model, with the library's `_logprob` (logits where a row
predicts an answer token, `logits_to_keep`) against logits at every position (what it did before), alternating
in one process. Prints the times, their ratios, and whether the two agree.

    python benchmarks/bench_logits.py [--repeats 3] [--threads 0]
"""
from __future__ import annotations

import statistics
import time

import torch

import mansu
from mansu import evaluation
from mansu.models import input_device

from side_by_side import setup  # benchmarks/, the script's own folder

KEPT = evaluation._logprob


def every_position(model: torch.nn.Module, batch: mansu.data.Batch) -> torch.Tensor:
    """The answer log-likelihood from logits at every position (the reference)."""
    batch = batch.to(input_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (token_lp * batch.target_mask).sum(-1)


def main() -> None:
    args, model, tokenizer = setup(__doc__, repeats=3)
    items = mansu.load_bundled("capitals") + mansu.load_bundled("cities")
    batch = mansu.data.encode_items(tokenizer, items[:32])
    weight = model.get_submodule("model.layers.3.mlp.down_proj").weight

    def evaluate() -> mansu.EvalResult:
        return mansu.evaluate(model, tokenizer, items, progress=False)

    def backward() -> torch.Tensor:
        model.zero_grad()
        evaluation.answer_logprob(model, batch).sum().backward()
        return weight.grad.clone()

    times: dict[tuple[str, str], list[float]] = {}
    outputs: dict[tuple[str, str], object] = {}
    for _ in range(args.repeats):
        for way, logprob in (("every position", every_position), ("answer positions", KEPT)):
            evaluation._logprob = logprob
            for task, fn in (("evaluate", evaluate), ("forward + backward", backward)):
                tick = time.perf_counter()
                outputs[way, task] = fn()
                times.setdefault((way, task), []).append(time.perf_counter() - tick)
    evaluation._logprob = KEPT
    print(f"embedded model, {torch.get_num_threads()} threads, median of {args.repeats}; evaluate: {len(items)} "
          f"items ({sum(len(it.choices) for it in items)} rows); backward: {len(batch.input_ids)} rows")
    print("| task | every position (s) | answer positions (s) | ratio |\n|---|---|---|---|")
    for task in ("evaluate", "forward + backward"):
        full, kept = (statistics.median(times[way, task]) for way in ("every position", "answer positions"))
        print(f"| {task} | {full:.2f} | {kept:.2f} | {kept / full:.2f} |")
    before, after = outputs["every position", "evaluate"], outputs["answer positions", "evaluate"]
    gap = outputs["every position", "forward + backward"] - outputs["answer positions", "forward + backward"]
    print(f"same answers: {before.correct == after.correct}; true prob {before.true_prob:.9f} vs "
          f"{after.true_prob:.9f}; gradient max |difference| {gap.abs().max().item():.1e}")


if __name__ == "__main__":
    main()
