"""A Trainer-based unlearning recipe with its own loss (NPO on the forget set plus the retain NLL), made
quantization-permanent in two lines: `trainer.add_callback(MansuCallback(...))`.

    python examples/trainer_callback.py            # the embedded SmolLM2-135M, demo split
    python examples/trainer_callback.py --edit JSON  # edit-loop (MansuConfig) fields of the hardening to change
    python examples/trainer_callback.py --harden JSON  # the hardening's own (HardenConfig) fields to change
    python examples/trainer_callback.py --json R.json  # also save the hardening's result (its rounds included)
    python examples/trainer_callback.py --smoke    # a tiny random model: the plumbing only
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from _common import SMOKE, Measure, Numbers, harden_config, load, report
from transformers import Trainer, TrainingArguments

import mansu
from mansu.data import Batch, encode_items
from mansu import answer_logprob
from mansu.integrations import MansuCallback


class NPOTrainer(Trainer):
    """NPO (Zhang et al. 2024) on whole-answer log-probability ratios against the start, plus the retain NLL."""

    def __init__(self, *args, forget_batch: Batch, beta: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.forget_batch, self.beta = forget_batch, beta
        with torch.no_grad():
            self.reference = answer_logprob(self.model, forget_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ratio = answer_logprob(model, self.forget_batch) - self.reference
        npo = (2 / self.beta) * F.softplus(self.beta * ratio).mean()
        return npo - answer_logprob(model, Batch(**inputs)).mean()


def main(smoke: bool = SMOKE) -> tuple[mansu.UnlearnResult, Numbers]:
    s = load(smoke)
    measure = Measure(s)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=3 if smoke else 20, learning_rate=1e-3 if smoke else 1e-5,
                                 per_device_train_batch_size=10, lr_scheduler_type="constant", weight_decay=0.0,
                                 report_to=[], save_strategy="no", logging_steps=5, disable_tqdm=True, seed=0,
                                 dataloader_pin_memory=False)
        trainer = NPOTrainer(s.model, args, train_dataset=s.retain, forget_batch=encode_items(s.tokenizer, s.forget),
                             data_collator=lambda items: vars(encode_items(s.tokenizer, items)))
        callback = MansuCallback(s.tokenizer, s.forget, s.retain, harden_config(smoke))  # the two lines
        trainer.add_callback(callback)
        trainer.train()
    return callback.result, report("NPO Trainer + MansuCallback", callback.result, measure.after())


if __name__ == "__main__":
    main()
