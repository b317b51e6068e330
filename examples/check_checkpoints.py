"""The permanence certificate between two checkpoints from elsewhere: which weights the edit changed, and
whether each of them flips its NF4 code; nothing else may. The same as `mansu check --before A --after B`
(add formats, e.g. "fp4", for other deployments: an edit floored for NF4 need not flip FP4 codes).

    python examples/check_checkpoints.py BEFORE_DIR AFTER_DIR
    python examples/check_checkpoints.py --smoke    # tiny checkpoints saved here: one fails, one holds
"""
from __future__ import annotations

import sys
import tempfile

from _common import load

import mansu


def certify(before: str, after: str) -> mansu.Certificate:
    """Check two saved model directories (or 'smollm2-135m' for the embedded model)."""
    from mansu.models import resolve_model_path

    certificate = mansu.check(resolve_model_path(before), resolve_model_path(after), ["nf4"])
    print(certificate.table())
    print("certified: every changed weight flips its code, nothing else does" if certificate.certified else
          "not certified: some changed weights keep their code (quantization rounds them away) or others flip")
    return certificate


def smoke() -> list[mansu.Certificate]:
    """Save a tiny model, a sub-bin nudge of one weight (as gradient unlearning makes) and the same nudge floored
    across its bins (as mansu makes), then certify each against the original: the first fails, the second holds."""
    s = load(smoke=True)
    state = {k: v.clone() for k, v in s.model.state_dict().items()}
    name = "model.layers.0.mlp.down_proj.weight"
    nudged = state[name] * 1.001
    certificates = []
    with tempfile.TemporaryDirectory() as tmp:
        mansu.save_model(s.model, s.tokenizer, f"{tmp}/before")
        for label, value in (("nudged", nudged), ("floored", mansu.floor_update(state[name], nudged))):
            s.model.load_state_dict(state | {name: value})
            mansu.save_model(s.model, s.tokenizer, f"{tmp}/{label}")
            print(f"== {label}")
            certificates.append(certify(f"{tmp}/before", f"{tmp}/{label}"))
    return certificates


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        smoke()
    elif len(sys.argv) == 3:
        certify(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
