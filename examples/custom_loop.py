"""A plain PyTorch unlearning loop (AdamW on a GradDiff loss), made quantization-permanent with mansu's pieces:
each step's update is projected off the retain inputs' subspace (`mansu.null_space_projector`), and at the end
`mansu.harden` redoes the edit in moves NF4 keeps, with the certificate.

    python examples/custom_loop.py            # the embedded SmolLM2-135M, demo split
    python examples/custom_loop.py --edit JSON  # edit-loop (MansuConfig) fields of the hardening to change
    python examples/custom_loop.py --harden JSON  # the hardening's own (HardenConfig) fields to change
    python examples/custom_loop.py --json R.json  # also save the hardening's result (its rounds included)
    python examples/custom_loop.py --smoke    # a tiny random model: the plumbing only
"""
from __future__ import annotations

import torch
from _common import SMOKE, Measure, Numbers, harden_config, load, report

import mansu
from mansu.quant import quantized_weights


def main(smoke: bool = SMOKE) -> tuple[mansu.UnlearnResult, Numbers, Numbers]:
    s = load(smoke)
    measure = Measure(s)
    params = dict(s.model.named_parameters())
    # The projector keeps each quantized layer's output on retain inputs: delta[:, S] (I - U U^T), S all columns.
    mask = {n: torch.ones_like(params[n], dtype=torch.bool) for n in quantized_weights(s.model)}
    projector = mansu.null_space_projector(s.model, s.tokenizer, s.retain, mask, progress=False)

    # 10x GradDiff's default lr: the projection removes most of each step. After 40 steps full precision has
    # forgotten and NF4 has not (the first line printed): the gap hardening closes
    optimizer = torch.optim.AdamW(s.model.parameters(), lr=1e-3 if smoke else 3e-5, weight_decay=0.0)
    s.model.train()
    for step in range(3 if smoke else 40):
        loss = s.graddiff_loss(s.model, step)
        optimizer.zero_grad()
        loss.backward()
        previous = {n: params[n].detach().clone() for n in mask}
        optimizer.step()
        with torch.no_grad():
            update = projector.apply({n: params[n] - previous[n] for n in mask})
            for n, delta in update.items():
                params[n].copy_(previous[n] + delta)
    s.model.eval()
    loop = measure.show("custom loop")

    result = mansu.harden(s.model, measure.original, s.tokenizer, s.forget, s.retain, harden_config(smoke))
    return result, loop, report("custom loop + harden", result, measure.after())


if __name__ == "__main__":
    main()
