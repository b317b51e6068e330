"""What the side-by-side timing scripts share: their command line (--repeats, --threads, --device, --dtype) and
the embedded model."""
from __future__ import annotations

import argparse
from typing import Any

import torch

import mansu


def setup(doc: str, repeats: int, parser: argparse.ArgumentParser | None = None
          ) -> tuple[argparse.Namespace, torch.nn.Module, Any]:
    """Parse `--repeats` (default `repeats`), `--threads`, `--device` and `--dtype` (besides `parser`'s own
    options), set torch's threads, and load the embedded model there."""
    parser = parser or argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = mansu.load_model(dtype=getattr(torch, args.dtype), device=args.device)
    return args, model, tokenizer
