"""k signed steps (gradient recomputed) of eps each, on half of the forget facts: accuracy of the other half after
each step, against the 10-step AdamW attack. Diagnostic only."""
import sys, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import mansu
from durability import suite
from mansu.probes import relearn_attack, fact_halves, sign_attacked
from mansu.data import encode_items
from mansu.evaluation import evaluate

splits = {s.name: s for s in suite()}
for name in sys.argv[1:]:
    forget, retain = splits[name].items()
    model, tok = mansu.load_model()
    mansu.unlearn(model, tok, forget, retain, mansu.MansuConfig(progress=False))
    rl = relearn_attack(model, tok, forget, formats=(), progress=False)
    row = {"adamw": [rl.before["full"], rl.after["full"]]}
    for train, held, tag in [(*fact_halves(forget, 0), "AB"), (*fact_halves(forget, 0)[::-1], "BA")]:
        batch = encode_items(tok, train)
        for eps in (1e-4, 3e-4):
            m, accs = model, []
            for k in range(5):
                m = sign_attacked(m, batch, eps)
                accs.append(evaluate(m, tok, held, progress=False).accuracy)
            row[f"{tag}-{eps}"] = accs
    print(name, json.dumps(row), flush=True)
