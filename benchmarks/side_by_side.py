"""What the side-by-side timing scripts share: their command line (--repeats, --threads) and the embedded model."""
from __future__ import annotations

import argparse
from typing import Any

import torch

import mansu


def setup(doc: str, repeats: int) -> tuple[argparse.Namespace, torch.nn.Module, Any]:
    """Parse `--repeats` (default `repeats`) and `--threads`, set torch's threads, load the embedded model."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = mansu.load_model()
    return args, model, tokenizer
