"""Does a one-step sign attack (eps * sign of the answer-NLL gradient, all parameters) predict the 10-step AdamW
relearning attack? Diagnostic only."""
import copy, sys, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import torch, mansu
from durability import suite
from mansu.probes import relearn_attack, fact_halves
from mansu.data import encode_items
from mansu.methods import retain_loss
from mansu.evaluation import evaluate

torch.manual_seed(0)
splits = {s.name: s for s in suite()}
out = {}
for name in sys.argv[1:]:
    forget, retain = splits[name].items()
    model, tok = mansu.load_model()
    res = mansu.unlearn(model, tok, forget, retain, mansu.MansuConfig(progress=False))
    rl = relearn_attack(model, tok, forget, formats=(), progress=False)
    train, held = fact_halves(forget, 0)
    row = {"adamw": [rl.before["full"], rl.after["full"]]}
    for who, items in (("half", train), ("all", forget)):
        m = copy.deepcopy(model)
        loss = retain_loss(m, encode_items(tok, items))
        loss.backward()
        grads = {n: p.grad.sign().clone() for n, p in m.named_parameters() if p.grad is not None}
        for eps in (3e-5, 1e-4, 3e-4, 1e-3):
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n in grads:
                        p.sub_(eps * grads[n]); 
            acc = evaluate(m, tok, held, progress=False).accuracy
            acc_all = evaluate(m, tok, forget, progress=False).accuracy
            row[f"{who}-{eps}"] = [acc, acc_all]
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n in grads:
                        p.add_(eps * grads[n])
    out[name] = row
    print(name, json.dumps(row), flush=True)
