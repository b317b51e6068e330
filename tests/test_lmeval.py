"""The lm-evaluation-harness export: the files' content here; lm-eval's own scores where it is installed."""
import json

import pytest
import torch
import yaml

import mansu
from mansu.cli import main
from mansu.data import Item, encode
from mansu.evaluation import answer_logprob

ITEMS = [Item("The capital of France is", "Paris", ("Rome", "Paris", "Oslo")),
         Item("Water is made of hydrogen and ", "oxygen", ("oxygen", "gold")),  # ends in a space: no second one
         Item("Die Hauptstadt von Österreich ist", "Wien", ("Wien", "Bern"))]


def test_export_writes_a_multiple_choice_task_scoring_what_evaluate_scores(tmp_path):
    path = mansu.export_lmeval(ITEMS, tmp_path / "tasks", "facts")
    task = yaml.safe_load(path.read_text(encoding="utf-8"))
    data = tmp_path / "tasks" / "facts.jsonl"
    assert task == {"task": "facts", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                    "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "prompt",
                    "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": "",
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {"prompt": "The capital of France is", "choices": [" Rome", " Paris", " Oslo"], "gold": 1},
        {"prompt": "Water is made of hydrogen and ", "choices": ["oxygen", "gold"], "gold": 0},
        {"prompt": "Die Hauptstadt von Österreich ist", "choices": [" Wien", " Bern"], "gold": 0}]
    # prompt + choice is the very text mansu scores
    for it, r in zip(ITEMS, records):
        assert r["prompt"] + r["choices"][r["gold"]] == it.prompt + it.continuation


def test_export_replaces_only_its_own_files(tmp_path):
    mansu.export_lmeval(ITEMS, tmp_path, "facts")
    mansu.export_lmeval(ITEMS[:1], tmp_path, "facts")  # its own: replaced
    assert len((tmp_path / "facts.jsonl").read_text().splitlines()) == 1
    (tmp_path / "mine.yaml").write_text("task: mine\n")
    (tmp_path / "other.jsonl").write_text("precious\n")
    with pytest.raises(mansu.MansuError, match="not written by mansu"):
        mansu.export_lmeval(ITEMS, tmp_path, "mine")
    with pytest.raises(mansu.MansuError, match="not written by mansu"):
        mansu.export_lmeval(ITEMS, tmp_path, "other")
    assert (tmp_path / "mine.yaml").read_text() == "task: mine\n"
    assert (tmp_path / "other.jsonl").read_text() == "precious\n" and not (tmp_path / "other.yaml").exists()
    with pytest.raises(mansu.MansuError, match="no choices"):
        mansu.export_lmeval([Item("a b", "c")], tmp_path, "open")
    with pytest.raises(mansu.MansuError, match="task name"):
        mansu.export_lmeval(ITEMS, tmp_path, "../escape")


def test_cli_exports_a_bundled_set(tmp_path, capsys):
    assert main(["export-lmeval", "--items", "elements", "--out", str(tmp_path), "--name", "elements_mc"]) == 0
    lines = (tmp_path / "elements_mc.jsonl").read_text().splitlines()
    assert len(lines) == len(mansu.load_bundled("elements")) and "--include_path" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["tiny", pytest.param("embedded", marks=pytest.mark.slow)])
def test_lm_eval_scores_exactly_what_mansu_evaluate_scores(which, tmp_path, tokenizer, capitals):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from conftest import make_tiny

    if which == "tiny":
        model, tok, items = make_tiny("llama", tokenizer), tokenizer, capitals[:24]
    else:  # the demo split's forget set on the real model
        (model, tok), items = mansu.load_model(), mansu.split(capitals, 10, seed=0)[0]
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    mansu.export_lmeval(items, tmp_path / "tasks", "mansu_check")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'model'},dtype=float32",
                                  tasks=["mansu_check"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  device="cpu", batch_size=8, log_samples=True)
    ours = mansu.evaluate(model, tok, items, progress=False)
    samples = sorted(out["samples"]["mansu_check"], key=lambda s: s["doc_id"])
    print(f"{which}: lm-eval acc {out['results']['mansu_check']['acc,none']}, mansu.evaluate {ours.accuracy}")
    assert [bool(s["acc"]) for s in samples] == ours.correct
    # and each choice's log-likelihood is the one mansu sums
    for it, sample in zip(items, samples):
        with torch.no_grad():
            mine = answer_logprob(model, encode(tok, [it.prompt] * len(it.choices), list(it.choices)))
        theirs = torch.tensor([float(r[0]) for r in sample["filtered_resps"]])
        assert torch.allclose(mine, theirs, atol=1e-3), it.prompt
    assert out["results"]["mansu_check"]["acc,none"] == pytest.approx(ours.accuracy)
