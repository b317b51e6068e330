"""LoRA unlearning (peft): train adapters on a GradDiff loss, merge them, harden, certify. A merged LoRA
update is low-rank and small: spread over every weight of the adapted layers, far below an NF4 bin.

    python examples/peft_lora.py            # the embedded SmolLM2-135M, demo split
    python examples/peft_lora.py --edit JSON  # edit-loop (MansuConfig) fields of the hardening to change
    python examples/peft_lora.py --harden JSON  # the hardening's own (HardenConfig) fields to change
    python examples/peft_lora.py --json R.json  # also save the hardening's result (its rounds included)
    python examples/peft_lora.py --smoke    # a tiny random model: the plumbing only
"""
from __future__ import annotations

import torch
from _common import SMOKE, Measure, Numbers, harden_config, load, report
from peft import LoraConfig, get_peft_model

import mansu

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(smoke: bool = SMOKE) -> tuple[mansu.UnlearnResult, Numbers, Numbers]:
    s = load(smoke)
    measure = Measure(s)  # the original weights, before peft wraps the model
    torch.manual_seed(0)  # peft draws the adapters' A matrices from the global RNG: unseeded, no two runs agree
    lora = get_peft_model(s.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3 if smoke else 1e-4,
                                  weight_decay=0.0)
    lora.train()
    for step in range(3 if smoke else 30):
        loss = s.graddiff_loss(lora, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    s.model = lora.merge_and_unload().eval()  # a plain model again, the adapters folded into its weights
    merged = measure.show("LoRA, merged")

    result = mansu.harden(s.model, measure.original, s.tokenizer, s.forget, s.retain, harden_config(smoke))
    return result, merged, report("LoRA + harden", result, measure.after())


if __name__ == "__main__":
    main()
