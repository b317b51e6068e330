"""Harden a model unlearned elsewhere: GradDiff forgets in full precision, NF4 brings the knowledge back;
`mansu.harden` redoes the edit in moves NF4 keeps, and certifies them against the original.

    python examples/harden.py                       # the embedded SmolLM2-135M, demo split (minutes on a CPU)
    python examples/harden.py --harden '{"direction": "descent"}'   # HardenConfig fields to change
    python examples/harden.py --edit '{"saturate_on": "quantized"}'   # edit-loop (MansuConfig) fields to change
    python examples/harden.py --json R.json  # also save the hardening's result (its rounds included)
    python examples/harden.py --smoke               # a tiny random model (seconds): the plumbing only
"""
from __future__ import annotations

from _common import SMOKE, Measure, Numbers, harden_config, load, report

import mansu


def main(smoke: bool = SMOKE) -> tuple[mansu.UnlearnResult, Numbers, Numbers]:
    s = load(smoke)
    measure = Measure(s)
    # The run from elsewhere: GradDiff at its defaults (a tiny model needs a larger step to move at all).
    config = mansu.BaselineConfig(method="graddiff", lr=1e-3, max_steps=3) if smoke else mansu.BaselineConfig()
    mansu.unlearn(s.model, s.tokenizer, s.forget, s.retain, config)
    graddiff = measure.show("GradDiff")

    result = mansu.harden(s.model, measure.original, s.tokenizer, s.forget, s.retain, harden_config(smoke))
    return result, graddiff, report("GradDiff + harden", result, measure.after())


if __name__ == "__main__":
    main()
