"""What the examples share: the model and split, and the numbers issue #12 asks of every path.

Full runs use the embedded SmolLM2-135M on the demo split (forget 10 capitals, retain the other 59; utility:
the bundled sets the split does not touch). `--smoke` (or MANSU_SMOKE=1) runs the same code on a tiny random
model in seconds: it checks the plumbing and the certificate, not the forgetting (a random model knows nothing).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

import mansu
from mansu.data import encode_items
from mansu import answer_logprob
from mansu.report import default_utility


def option(flag: str) -> str | None:
    """The value given after `flag` on the command line, or None without it."""
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else None


SMOKE = "--smoke" in sys.argv or os.environ.get("MANSU_SMOKE") == "1"
EDIT = json.loads(option("--edit") or "{}")  # edit-loop (MansuConfig) fields of the hardening to change
HARDEN = json.loads(option("--harden") or "{}")  # the hardening's own (HardenConfig) fields to change
JSON = option("--json")  # where to save the hardening's result
TARGET_FORGET, MAX_UTILITY_DROP = 0.35, 0.05  # issue #12's bar, full precision and NF4 alike


@dataclass
class Setup:
    """A model to unlearn, its tokenizer, the split, and the untouched utility items."""

    model: torch.nn.Module
    tokenizer: object
    forget: list
    retain: list
    utility: list
    smoke: bool

    def graddiff_loss(self, model: torch.nn.Module, step: int, batch_size: int = 10) -> torch.Tensor:
        """A user's GradDiff loss: ascend the forget answers' NLL, descend a retain batch's (cycling)."""
        start = step * batch_size % len(self.retain)
        retain = encode_items(self.tokenizer, (self.retain * 2)[start : start + batch_size])
        forget = encode_items(self.tokenizer, self.forget)
        return answer_logprob(model, forget).mean() - answer_logprob(model, retain).mean()


def load(smoke: bool = SMOKE) -> Setup:
    """The embedded model on the demo split, or with `smoke` a tiny random Llama and a few items."""
    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10, seed=0)
    utility, _ = default_utility(forget, retain)
    if not smoke:
        return Setup(*mansu.load_model(), forget, retain, utility, smoke)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(mansu.models.embedded_model_dir())
    mansu.models.prepare_tokenizer(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    return Setup(model, tokenizer, forget[:4], retain[:8], utility[:8], smoke)


def harden_config(smoke: bool = SMOKE, edit: dict | None = None, harden: dict | None = None) -> mansu.HardenConfig:
    """mansu.harden's defaults, with the HardenConfig fields of `harden` (default: `--harden JSON`) and the
    edit-loop fields of `edit` (default: `--edit JSON`) changed; on a tiny model a few small rounds that always
    run (its target is unreachable)."""
    if smoke:
        small = mansu.MansuConfig(progress=False, edits_per_round=50, max_rounds=2, target_forget_acc=0.0,
                                  retain_sample=4, protect=None)
        config = mansu.HardenConfig(top_fraction=0.05, edit=small)
    else:
        config = mansu.HardenConfig()
    # replace: the configs check the new values
    config = replace(config, **(HARDEN if harden is None else harden))
    return replace(config, edit=replace(config.edit, **(EDIT if edit is None else edit)))


@dataclass
class Numbers:
    """Forget accuracy full / NF4, untouched utility before and after (full and NF4), the certificate."""

    forget_full: float
    forget_nf4: float
    utility_full: tuple[float, float]  # before, after
    utility_nf4: tuple[float, float]
    flipped_fraction: float  # of the weights that differ from the original, those whose NF4 code flipped
    collateral: int  # code flips of weights that did not change
    seconds: float  # since the snapshot before the edit (the other method's and the hardening's time)

    def meets_targets(self) -> bool:
        """Issue #12's bar: forgotten in full precision and NF4, utility kept, certificate 1.0."""
        drops = [before - after for before, after in (self.utility_full, self.utility_nf4)]
        return (max(self.forget_full, self.forget_nf4) <= TARGET_FORGET and max(drops) <= MAX_UTILITY_DROP
                and self.flipped_fraction == 1.0 and self.collateral == 0)

    def __str__(self) -> str:
        # utility to 3 decimals: one of the 268 untouched items is 0.004, and the bar's 0.05 is 13 of them
        return (f"forget full {self.forget_full:.2f} / NF4 {self.forget_nf4:.2f}; utility full "
                f"{self.utility_full[0]:.3f} -> {self.utility_full[1]:.3f}, NF4 {self.utility_nf4[0]:.3f} -> "
                f"{self.utility_nf4[1]:.3f}; certificate {self.flipped_fraction:.4f} flipped, {self.collateral} "
                f"collateral; {self.seconds:.0f} s; issue #12's targets {'met' if self.meets_targets() else 'MISSED'}")


def accuracy(model: torch.nn.Module, tokenizer, items: list) -> tuple[float, float]:
    """Accuracy on `items` in full precision and on the NF4 copy (what a 4-bit release would run)."""
    nf4 = mansu.quantized_copy(model, "nf4")
    return tuple(mansu.evaluate(m, tokenizer, items, progress=False).accuracy for m in (model, nf4))


class Measure:
    """Snapshot before an edit (original weights, utility, clock); `after()` gives the edit's `Numbers`."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.original = {n: p.detach().clone() for n, p in setup.model.state_dict().items()}
        self.utility_before = accuracy(setup.model, setup.tokenizer, setup.utility)
        self.start = time.perf_counter()

    def show(self, label: str) -> Numbers:
        """`after()`, printed under `label`."""
        numbers = self.after()
        print(f"{label}: {numbers}")
        return numbers

    def after(self) -> Numbers:
        s = self.setup
        seconds = time.perf_counter() - self.start
        forget = accuracy(s.model, s.tokenizer, s.forget)
        utility = accuracy(s.model, s.tokenizer, s.utility)
        nf4 = mansu.check(self.original, s.model, ["nf4"])["nf4"]
        return Numbers(forget[0], forget[1], (self.utility_before[0], utility[0]),
                       (self.utility_before[1], utility[1]), nf4.fraction, nf4.collateral, seconds)


def report(label: str, result: mansu.UnlearnResult, numbers: Numbers) -> Numbers:
    """Print a hardening's result, its certificate table and the numbers (with `--json PATH`, also save the
    result, its rounds included); return the numbers."""
    if JSON is not None:
        result.save_json(JSON)
    print(result)
    print(result.certificate.table())
    print(f"{label}: {numbers}")
    return numbers
