"""Nothing the user owns is ever lost: saves, reports, plots and the demo's folder (issue #13)."""
import hashlib
import json
import os

import pytest

import mansu
from mansu import files, models
from mansu.cli import main

from conftest import make_tiny


def snapshot(folder):
    """Every file below `folder` (hidden ones too) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny(tokenizer):
    return make_tiny("llama", tokenizer), tokenizer


@pytest.fixture
def saved(tmp_path, tiny):
    """A model saved by mansu at tmp_path/edited, with a file of the user's beside it."""
    target = tmp_path / "edited"
    mansu.save_model(*tiny, target)
    (target / "notes.md").write_text("mine")
    return target


def test_save_into_new_and_empty_directories_loads_back(tmp_path, tiny):
    for target in (tmp_path / "new" / "model", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        mansu.save_model(*tiny, target)
        model, _ = mansu.load_model(str(target))
        assert model.config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary folders left


def test_save_refuses_a_file_and_a_directory_holding_no_model(tmp_path, tiny):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("chapter 1")
    (work / "config.json").write_text("{}")  # a config alone is not a model
    before = snapshot(tmp_path)
    with pytest.raises(mansu.MansuError, match="existing file"):
        mansu.save_model(*tiny, notes)
    with pytest.raises(mansu.MansuError, match="not empty and holds no model"):
        mansu.save_model(*tiny, work)
    assert snapshot(tmp_path) == before


def test_save_over_a_previous_save_replaces_only_model_files(tmp_path, tiny, tokenizer):
    target = tmp_path / "edited"
    mansu.save_model(*tiny, target)
    (target / "README.md").write_text("my model card")
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of an older save")
    mansu.save_model(make_tiny("llama", tokenizer, seed=1), tokenizer, target)
    names = {p.name for p in target.iterdir()}
    assert "README.md" in names and "model-00002-of-00002.safetensors" not in names
    assert (target / "README.md").read_text() == "my model card"
    reloaded, _ = mansu.load_model(str(target))
    expected = make_tiny("llama", tokenizer, seed=1).state_dict()
    assert all((reloaded.state_dict()[k] == v).all() for k, v in expected.items())
    assert [p.name for p in tmp_path.iterdir()] == ["edited"]


def test_save_refuses_to_replace_a_user_file_with_a_model_file_name(tmp_path, tiny, saved, monkeypatch):
    real = tiny[1].save_pretrained

    def also_writes_notes(directory, **kwargs):  # as if a tokenizer wrote a file the user has too
        out = real(directory, **kwargs)
        (directory / "notes.md").write_text("tokenizer's")
        return out

    monkeypatch.setattr(tiny[1], "save_pretrained", also_writes_notes)
    before = snapshot(tmp_path)
    with pytest.raises(mansu.MansuError, match="notes.md"):
        mansu.save_model(*tiny, saved)
    assert snapshot(tmp_path) == before


def test_a_save_interrupted_while_writing_leaves_the_previous_model_whole(tmp_path, tiny, saved, monkeypatch):
    before = snapshot(tmp_path)

    def crash(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the weights

    monkeypatch.setattr(tiny[0], "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        mansu.save_model(*tiny, saved)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_a_save_interrupted_while_swapping_files_is_undone(tmp_path, tiny, saved, monkeypatch, fail_at):
    before = snapshot(tmp_path)
    real, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(src)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(models.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        mansu.save_model(*tiny, saved)
    assert len(calls) >= fail_at
    assert snapshot(tmp_path) == before


def test_files_mansu_did_not_write_are_refused_its_own_replaced(tmp_path):
    mine = tmp_path / "report.json"
    mine.write_text('{"accuracy": 1}')
    with pytest.raises(mansu.MansuError, match="not written by mansu"):
        files.write_json(mine, {"a": 1})
    assert mine.read_text() == '{"accuracy": 1}'
    ours = tmp_path / "ours.json"
    files.write_json(ours, {"a": 1})
    files.write_json(ours, {"a": 2})  # a report mansu wrote is replaced on the next run
    assert files.read_json(ours) == {"a": 2}
    with pytest.raises(mansu.MansuError, match="is a directory"):
        files.write_text(tmp_path, "x")
    with pytest.raises(mansu.MansuError, match="is a file, not a directory"):
        files.write_text(mine / "below.txt", "x")


def test_demo_folder_is_claimed_only_when_new_or_a_previous_demo(tmp_path, capsys):
    names = ["table.txt", "mansu.json"]
    assert files.claim_folder(tmp_path / "new", names) == tmp_path / "new"
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "table.txt").write_text("old table")
    files.write_json(previous / "mansu.json", {"method": "mansu"})
    assert files.claim_folder(previous, names) == previous
    (previous / "mansu.json").write_text("{}")  # same name, but not mansu's
    with pytest.raises(mansu.MansuError, match="mansu.json"):
        files.claim_folder(previous, names)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("chapter 1")
    before = snapshot(tmp_path)
    assert main(["demo", "--out-dir", str(home)]) == 2  # refused before anything runs
    assert "thesis.tex" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_plot_replaces_its_own_png_but_not_the_users(tmp_path):
    from mansu.report import plot_update_ratios

    path = plot_update_ratios([], tmp_path / "plot.png")
    assert files.written_by_mansu(path)
    plot_update_ratios([], path)
    users = tmp_path / "photo.png"
    users.write_bytes(b"\x89PNG\r\n\x1a\n" + b"user pixels")
    with pytest.raises(mansu.MansuError, match="not written by mansu"):
        plot_update_ratios([], users)
    assert users.read_bytes().endswith(b"user pixels")


def write_items(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "answer": "x", "choices": ["x", "y"]}) + "\n"
                            for p in prompts))
    return str(path)


def test_cli_checks_every_output_path_before_the_work(tmp_path, capsys):
    forget = write_items(tmp_path / "f.jsonl", ["a is"])
    retain = write_items(tmp_path / "r.jsonl", ["b is"])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2")
    before = snapshot(tmp_path)
    model = str(tmp_path / "missing-model")  # would fail later: the path checks must come first
    for argv, message in [
        (["run", "--forget", forget, "--retain", retain, "--out", str(notes), "--model", model], "notes.txt"),
        (["run", "--forget", forget, "--retain", retain, "--out", str(tmp_path / "r.json"), "--save",
          str(notes), "--model", model], "existing file"),
        (["run", "--forget", forget, "--retain", retain, "--out", str(tmp_path / "r.json"), "--save",
          str(work), "--model", model], "holds no model"),
        (["eval", "--items", forget, "--out", str(notes), "--model", model], "notes.txt"),
        (["check", "--before", model, "--after", model, "--json", str(notes)], "notes.txt"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_an_item_in_both_forget_and_retain_is_an_error(tmp_path, tiny, capsys):
    forget = write_items(tmp_path / "f.jsonl", ["The capital of Peru is"])
    retain = write_items(tmp_path / "r.jsonl", ["The capital of Chile is", " The capital of Peru is "])
    assert main(["run", "--forget", forget, "--retain", retain, "--out", str(tmp_path / "r.json")]) == 2
    assert "The capital of Peru is" in capsys.readouterr().err
    items = mansu.load_items(forget)
    before = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    for config in (mansu.MansuConfig(progress=False), mansu.BaselineConfig()):
        with pytest.raises(mansu.MansuError, match="both the forget and the retain set"):
            mansu.unlearn(*tiny, items, items, config)
    assert all((tiny[0].state_dict()[k] == v).all() for k, v in before.items())
