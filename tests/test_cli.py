import json
import sys

import pytest

from mansu import files
from mansu.cli import main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "run", "eval", "check"):
        assert command in out


def test_eval_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--items", "elements", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["accuracy"] >= 0.9 and report["n"] == len(report["correct"])
    assert "accuracy" in capsys.readouterr().out


def test_user_mistakes_exit_nonzero_with_one_line_and_keep_existing_files(tmp_path, capsys):
    existing = tmp_path / "r.json"
    existing.write_text("precious")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b", "choices": ["c", "d"]}\n')
    assert main(["eval", "--items", str(bad), "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:1" in err and "Traceback" not in err
    assert existing.read_text() == "precious"


@pytest.mark.parametrize("config,message", [("{bad", "--config is not valid JSON"), ("[1]", "must be a JSON object"),
                                            ('{"anchor_gaurd": 0.1}', "unknown MansuConfig field(s) ['anchor_gaurd']"),
                                            ('{"anchor_guard": 2}', "anchor_guard must be in")])
def test_run_config_mistakes_fail_before_any_model_is_loaded(tmp_path, capsys, monkeypatch, config, message):
    import mansu

    monkeypatch.setattr(mansu, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "r.json"
    code = main(["run", "--forget", "elements", "--retain", "languages", "--out", str(out), "--config", config])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_run_can_train_on_paraphrases(tmp_path, monkeypatch):
    import mansu
    import mansu.report

    seen = {}

    def stop(model, tokenizer, forget, *args, **kwargs):
        seen["forget"] = forget
        raise mansu.MansuError("stopped here")

    monkeypatch.setattr(mansu, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(mansu.report, "run", stop)
    args = ["run", "--forget", "elements", "--retain", "languages", "--out", str(tmp_path / "r.json")]
    assert main(args + ["--train-paraphrases", "1"]) == 2
    assert seen["forget"] == mansu.train_on_paraphrases(mansu.load_items("elements"), 1)
    assert main(args + ["--train-paraphrases", "-1"]) == 2 and not (tmp_path / "r.json").exists()


def test_run_shows_mansus_warnings_as_one_line_when_they_happen(tmp_path, monkeypatch, capsys):
    import mansu
    import mansu.report

    def stop(model, tokenizer, forget, retain, *args, **kwargs):
        mansu.data.warn_if_relation_unkept(forget, retain)  # what `unlearn` warns first
        print("the edit goes on", file=sys.stderr)
        raise mansu.MansuError("stopped here")

    monkeypatch.setattr(mansu, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(mansu.report, "run", stop)
    assert main(["run", "--forget", "elements", "--retain", "languages", "--out", str(tmp_path / "r.json")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("mansu: warning: no retain prompt asks the forget prompts' relation ('The chemical "
                               "symbol for ... is')")
    assert lines[1:] == ["the edit goes on", "mansu: error: stopped here"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "report.json"
    files.write_json(path, {"a": 1})

    def explode(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, explode)
    assert files.read_json(path) == {"a": 1} and list(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError):
        files.write_json(path, {"x": float("nan")})
    assert files.read_json(path) == {"a": 1}
