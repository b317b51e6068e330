"""What running each multiple-choice prompt once saves: `mansu.evaluation.choice_scores` (each distinct prompt
once, its cache continued by every choice; rows in order of prompt length) against whole (prompt, choice) rows in
item order, 32 a forward (what it did before), alternating in one process on the embedded model. Sets: the default
utility set of the demo split (forget 10 capitals), and the cities' paraphrases. Prints the share of prompt tokens,
the times, their ratio, the largest difference of a row's score, and whether every item's verdict agrees.

    python benchmarks/bench_shared_prompts.py [--repeats 2] [--threads 0] [--device cuda] [--dtype bfloat16]
                                              [--size 8B]   # random weights of that shape: time alone
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mansu
from mansu.data import continuation, encode, split_tokens
from mansu.evaluation import answer_logprob, choice_rows, choice_scores
from mansu.probes import paraphrase_items
from mansu.report import default_utility

import scale  # benchmarks/, the script's own folder
from side_by_side import setup


@torch.no_grad()
def whole_rows(model: torch.nn.Module, tokenizer, items: list, batch_size: int = 32) -> torch.Tensor:
    """Every (prompt, choice) row's answer log-likelihood, each row run whole, in item order (the reference)."""
    prompts, answers, _ = choice_rows(items)
    return torch.cat([answer_logprob(model, encode(tokenizer, prompts[i : i + batch_size], answers[i : i + batch_size]))
                      for i in range(0, len(prompts), batch_size)]).cpu()


def verdicts(scores: torch.Tensor, items: list) -> list[bool]:
    """Per item, whether its answer's row scores highest among its choices."""
    _, _, groups = choice_rows(items)
    return [int(scores[first : first + k].argmax()) == answer for first, k, answer in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(scale.SIZES), help="time a Llama of this shape with random weights "
                        "instead (on a GPU, say: 1B, 8B); its verdicts mean nothing")
    args, model, tokenizer = setup(__doc__, repeats=2, parser=parser)
    if args.size:
        model = scale.build(scale.SIZES[args.size], model.dtype, args.device)
        model.resize_token_embeddings(len(tokenizer))  # the embedded tokenizer's ids index it
    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10, seed=0)
    sets = {"utility": default_utility(forget, retain)[0],
            "paraphrases": paraphrase_items(mansu.load_bundled("cities"))}
    print(f"{args.size or 'embedded model'} on {args.device} in {args.dtype}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    for name, items in sets.items():
        times: dict[str, list[float]] = {"whole": [], "shared": []}
        for _ in range(args.repeats):
            tick = time.perf_counter()
            whole = whole_rows(model, tokenizer, items)
            times["whole"].append(time.perf_counter() - tick)
            tick = time.perf_counter()
            shared = choice_scores(model, tokenizer, items)[0]
            times["shared"].append(time.perf_counter() - tick)
        before, after = (statistics.median(times[w]) for w in ("whole", "shared"))
        prompts, answers, _ = choice_rows(items)
        rows = [split_tokens(tokenizer, p, continuation(p, a)) for p, a in zip(prompts, answers)]
        tokens, prompt_tokens = sum(len(row) for row, _ in rows), sum(first for _, first in rows)
        print(f"{name} ({len(items)} items, {len(rows)} rows, {tokens} tokens, {prompt_tokens / tokens:.0%} of them "
              f"prompt tokens): whole rows {before:.1f} s, shared prompts {after:.1f} s, "
              f"ratio {after / before:.2f}; largest score difference {(whole - shared).abs().max():.1e}; "
              f"verdicts agree: {verdicts(whole, items) == verdicts(shared, items)}")


if __name__ == "__main__":
    main()
