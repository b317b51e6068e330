"""The `mansu` command: a thin front end over the library (demo, run, eval, check, harden, export-lmeval)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from typing import Sequence

from .errors import MansuError, mansu_warnings

METHODS = ("mansu", "ga", "graddiff", "npo")
DEMO_FILES = ("forget.jsonl", "retain.jsonl", "graddiff.json", "mansu.json", "table.txt", "update_ratios.png")


def _eval(args: argparse.Namespace) -> None:
    import mansu
    from mansu.quant import evaluate_formats

    items = mansu.load_items(args.items)  # validate the cheap input before loading a model
    formats = [f for f in args.formats.split(",") if f]
    if args.out:
        mansu.files.claim(args.out)
    model, tokenizer = mansu.load_model(args.model, dtype=args.dtype)
    results = evaluate_formats(model, tokenizer, items, formats, batch_size=args.batch_size)
    for name, r in results.items():
        print(f"{args.model} [{name}] on {args.items}: accuracy {r.accuracy}, true-answer prob "
              f"{r.true_prob:.3f}, answer NLL {r.answer_nll:.3f} ({r.n} items)")
    if args.out:
        out = results["full"].to_dict() | {"formats": {k: r.to_dict() for k, r in results.items() if k != "full"}}
        mansu.files.write_json(args.out, out)
        print(f"wrote {args.out}")


def _check(args: argparse.Namespace) -> None:
    from mansu.files import claim
    from mansu.models import resolve_model_path
    from mansu.quant import check

    if args.json:
        claim(args.json)
    certificate = check(resolve_model_path(args.before), resolve_model_path(args.after), args.formats.split(","))
    print(certificate.table())
    if args.json:
        certificate.save_json(args.json)
        print(f"wrote {args.json}")


def _export_lmeval(args: argparse.Namespace) -> None:
    from mansu.lmeval import export_lmeval

    path = export_lmeval(args.items, args.out, args.name)
    print(f"wrote {path} and {path.with_suffix('.jsonl')}; score a model with:\n  lm_eval --model hf --model_args "
          f"pretrained=MODEL_DIR --include_path {path.parent} --tasks {args.name}")


def _run(args: argparse.Namespace) -> None:
    import mansu
    from mansu.config import from_dict
    from mansu.report import run

    forget, retain = mansu.load_items(args.forget), mansu.load_items(args.retain)
    forget = mansu.train_on_paraphrases(forget, args.train_paraphrases)
    utility = mansu.load_items(args.utility) if args.utility else None
    mansu.data.check_disjoint(forget=forget, retain=retain, utility=utility)
    mansu.files.claim(args.out)  # every output path is checked before the long work, not after it
    if args.save:
        mansu.models.claim_model_dir(args.save)
    fields = _config_fields(args.config)
    if args.method == "mansu":
        config = from_dict(mansu.MansuConfig, {"seed": args.seed, **fields})
    else:
        config = from_dict(mansu.BaselineConfig, {"method": args.method, "seed": args.seed, **fields})
    model, tokenizer = mansu.load_model(args.model)
    report = run(model, tokenizer, forget, retain, config, args.model, args.formats.split(","), save=args.save,
                 utility=utility, relearn=args.relearn)
    report.save_json(args.out)
    print(report)
    print(f"wrote {args.out}" + (f" and the model to {args.save}" if args.save else ""))


def _config_fields(text: str | None) -> dict:
    """`--config`: a JSON object of config fields, checked before any model is loaded."""
    if text is None:
        return {}
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise MansuError(f"--config is not valid JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(fields, dict):
        raise MansuError(f"--config must be a JSON object of config fields, got {text!r}")
    return fields


def _harden(args: argparse.Namespace) -> None:
    import mansu

    forget, retain = mansu.load_items(args.forget), mansu.load_items(args.retain)
    mansu.data.check_disjoint(forget=forget, retain=retain)
    if args.json:  # every output path is checked before the models load, not after the long work
        mansu.files.claim(args.json)
    mansu.models.claim_model_dir(args.out)
    original, _ = mansu.load_model(args.before)
    model, tokenizer = mansu.load_model(args.after)
    edit = dataclasses.replace(mansu.HardenConfig().edit, seed=args.seed, progress=True)  # harden's defaults
    result = mansu.harden(model, original, tokenizer, forget, retain, mansu.HardenConfig(edit=edit))
    del original
    mansu.save_model(model, tokenizer, args.out)
    last = result.rounds[-1] if result.rounds else {}
    print(result)
    print(f"forget accuracy: full {last.get('forget_acc_full')}, nf4 {last.get('forget_acc_nf4')}")
    print(result.certificate.table())
    if args.json:
        result.save_json(args.json)
    print(f"wrote the hardened model to {args.out}" + (f" and the report to {args.json}" if args.json else ""))
    if not result.converged:
        raise MansuError(f"hardening did not reach the forget target ({result.stop_reason}); the model was saved")


def _demo(args: argparse.Namespace) -> None:
    import mansu
    from mansu.report import RunReport, comparison_table, plot_update_ratios

    out = mansu.files.claim_folder(args.out_dir, DEMO_FILES)  # new, or a previous demo's: never the user's
    forget, retain = mansu.split(mansu.load_bundled("capitals"), 10, seed=0)
    for name, items in (("forget", forget), ("retain", retain)):
        mansu.data.write_jsonl(out / f"{name}.jsonl", items, replace=True)
    print(f"demo: forget {len(forget)} capitals, retain {len(retain)}, on {mansu.EMBEDDED_MODEL}; "
          f"each method runs in its own process so its peak memory is its own")
    reports = []
    for method in ("graddiff", "mansu"):
        path = out / f"{method}.json"
        cmd = [sys.executable, "-m", "mansu", "run", "--method", method, "--forget", str(out / "forget.jsonl"),
               "--retain", str(out / "retain.jsonl"), "--out", str(path), "--formats", "nf4", "--seed", str(args.seed),
               "--relearn"]
        print(f"\n== {method}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise MansuError(f"the {method} run failed (see its message above)")
        reports.append(RunReport.from_json(path))
    table = comparison_table(reports)
    plot = plot_update_ratios(reports, out / "update_ratios.png")
    mansu.files.write_text(out / "table.txt", table + "\n", replace=True)
    print("\n" + table)
    print(f"\nwrote {out}/graddiff.json, {out}/mansu.json, {out}/table.txt and {plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mansu", description="LLM unlearning that survives quantization.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "Hugging Face id, local directory, or 'smollm2-135m' (the embedded default)"

    demo = sub.add_parser("demo", help="MANSU vs GradDiff on the embedded model: table and plot")
    demo.add_argument("--out-dir", default="mansu-demo", help="where the reports, table and plot go")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="unlearn with one method; evaluate before/after, full and quantized")
    run.add_argument("--model", default="smollm2-135m", help=model_help)
    run.add_argument("--forget", required=True, help="JSONL items to forget (or a bundled set name)")
    run.add_argument("--retain", required=True, help="JSONL items to keep (or a bundled set name)")
    run.add_argument("--method", choices=METHODS, default="mansu")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--formats", default="nf4", help="comma-separated: nf4,nf4-dq,fp4,int8,q4_0,q4_1,q8_0")
    run.add_argument("--out", required=True, help="the JSON report (written atomically)")
    run.add_argument("--save", help="also save the edited model here (a normal Hugging Face directory)")
    run.add_argument("--utility", help="JSONL items the edit never sees, scored before and after (default: the "
                                       "bundled sets sharing no prompt with forget and retain)")
    run.add_argument("--config", help="JSON object of config fields that differ from the method's defaults, e.g. "
                                      "'{\"anchor_guard\": 0.02}' (MansuConfig or BaselineConfig; see docs/api.md)")
    run.add_argument("--train-paraphrases", type=int, default=0, metavar="N",
                     help="each forget item's first N paraphrases join the forget set (the edit trains on them); "
                          "the paraphrase probe reads the rest")
    run.add_argument("--relearn", action="store_true",
                     help="also attack the edit: fine-tune on half the forget set, score the other half")
    run.set_defaults(func=_run)

    ev = sub.add_parser("eval", help="cloze multiple-choice accuracy of a model on an item set")
    ev.add_argument("--model", default="smollm2-135m", help=model_help)
    ev.add_argument("--items", required=True, help="JSONL file of {prompt, answer, choices} or a bundled set name")
    ev.add_argument("--formats", default="", help="also evaluate quantized copies, e.g. nf4,q4_0")
    ev.add_argument("--out", help="write the result as JSON here (atomically)")
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.set_defaults(func=_eval)

    ch = sub.add_parser("check", help="permanence certificate: which changed weights flip their quantized code")
    ch.add_argument("--before", required=True, help="the original model directory (or 'smollm2-135m')")
    ch.add_argument("--after", required=True, help="the edited model directory")
    ch.add_argument("--formats", default="nf4", help="comma-separated formats, e.g. nf4,fp4")
    ch.add_argument("--json", help="write the certificate as JSON here (atomically)")
    ch.set_defaults(func=_check)

    ex = sub.add_parser("export-lmeval", help="write an item set as an lm-evaluation-harness task (YAML + JSONL)")
    ex.add_argument("--items", required=True, help="JSONL file of {prompt, answer, choices} or a bundled set name")
    ex.add_argument("--out", required=True, help="the folder the task files go to (lm-eval's --include_path)")
    ex.add_argument("--name", required=True, help="the task name (and the files' names)")
    ex.set_defaults(func=_export_lmeval)
    hd = sub.add_parser("harden", help="make another method's unlearned model keep its forgetting in NF4")
    hd.add_argument("--before", required=True, help="the original model (directory, HF id or 'smollm2-135m')")
    hd.add_argument("--after", required=True, help="the unlearned model (directory or HF id)")
    hd.add_argument("--forget", required=True, help="JSONL items it was meant to forget (or a bundled set name)")
    hd.add_argument("--retain", required=True, help="JSONL items to keep (or a bundled set name)")
    hd.add_argument("--out", required=True, help="directory for the hardened model (new, empty, or a saved model)")
    hd.add_argument("--json", help="write the result, rounds and certificate as JSON here (atomically)")
    hd.add_argument("--seed", type=int, default=0)
    hd.set_defaults(func=_harden)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with mansu_warnings(lambda message: print(f"mansu: warning: {message}", file=sys.stderr)):
        try:
            args.func(args)
        except MansuError as err:
            print(f"mansu: error: {err}", file=sys.stderr)
            return 2
    return 0
