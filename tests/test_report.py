import json

import pytest

import mansu
from mansu.cli import main
from mansu.report import RunReport, comparison_table, plot_update_ratios

FACTS = [("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Peru", "Lima"),
         ("Italy", "Rome")]


def write_items(path, facts):
    answers = [a for _, a in FACTS]
    lines = [json.dumps({"prompt": f"The capital of {c} is", "answer": a,
                         "choices": [a] + [x for x in answers if x != a][:3]}) for c, a in facts]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    from conftest import make_tiny

    return str(mansu.save_model(make_tiny("llama", tokenizer), tokenizer, tmp_path / "tiny"))


def test_run_writes_the_report_the_issue_asks_for_and_check_agrees(tmp_path, tiny_dir, capsys):
    forget, retain = write_items(tmp_path / "f.jsonl", FACTS[:2]), write_items(tmp_path / "r.jsonl", FACTS[2:])
    out, saved = tmp_path / "report.json", tmp_path / "edited"
    assert main(["run", "--model", tiny_dir, "--forget", forget, "--retain", retain, "--method", "graddiff",
                 "--formats", "nf4,q4_0", "--out", str(out), "--save", str(saved), "--relearn"]) == 0
    report = json.loads(out.read_text())
    for when in ("before", "after"):
        for fmt in ("full", "nf4"):
            assert {"forget_acc", "retain_acc", "utility_acc", "generation_recall"} <= set(report[when][fmt])
            assert report[when][fmt]["paraphrase_acc"] is None  # these items carry no paraphrases
        # other formats score the forget set only: forgetting must hold in each
        assert set(report[when]["q4_0"]) == {"forget_acc", "forget_true_prob", "forget_correct"}
        for scores in report[when].values():  # per forget item, whether its answer won: the accuracy's terms
            assert len(scores["forget_correct"]) == 2
            assert scores["forget_acc"] == sum(scores["forget_correct"]) / 2
    assert "score: " in capsys.readouterr().err  # a bar over the scoring, which takes minutes on a CPU
    # the default utility: bundled sets sharing no prompt with forget and retain (capitals does)
    assert "capitals" not in report["utility_sets"] and {"elements", "languages"} <= set(report["utility_sets"])
    assert report["n_utility"] == sum(min(40, len(mansu.load_bundled(n))) for n in report["utility_sets"])
    assert report["relearn"]["n_train"] == 1 and set(report["relearn"]["after"]) == {"full", "nf4", "q4_0"}
    summary = RunReport.from_json(out).summary()  # the probes in the short form, where measured
    assert summary["relearned_full"] == report["relearn"]["after"]["full"] - report["relearn"]["before"]["full"]
    assert "paraphrase_full" not in summary  # these items carry no paraphrases
    worded = mansu.files.read_json(out)
    worded["after"]["nf4"]["paraphrase_acc"] = 0.25
    assert RunReport(**worded).summary()["paraphrase_nf4"] == 0.25 and "paraphrase_nf4" in repr(RunReport(**worded))
    items = mansu.load_items(forget)
    _, (held,) = mansu.probes.fact_halves(items)
    for fmt, accuracy in report["relearn"]["before"].items():  # read from the scores after the edit
        assert accuracy == report["after"][fmt]["forget_correct"][items.index(held)]
    assert report["warnings"] == []  # the retain set asks the forgotten relation of other countries
    utility = write_items(tmp_path / "u.jsonl", FACTS[2:3])
    assert main(["run", "--model", tiny_dir, "--forget", forget, "--retain", retain, "--utility", utility,
                 "--out", str(tmp_path / "u.json")]) == 2  # utility shares a prompt with retain: refused
    gap = report["after"]["nf4"]["forget_acc"] - report["after"]["full"]["forget_acc"]
    assert report["ptq_gap"]["nf4"] == pytest.approx(gap)
    assert {"changed", "flipped", "collateral", "fraction"} <= set(report["permanence"]["nf4"])
    assert 0 <= report["cad"] <= 1 and report["timing_s"]["unlearn"] <= report["timing_s"]["total"]
    assert report["peak_rss_mb"] > 0
    # the saved model is a normal HF directory, and `mansu check` on it reproduces the report's counts
    assert main(["check", "--before", tiny_dir, "--after", str(saved), "--formats", "nf4,fp4", "--json",
                 str(tmp_path / "c.json")]) == 0
    formats = json.loads((tmp_path / "c.json").read_text())["formats"]
    assert set(formats) == {"nf4", "fp4"}  # --formats, spelt as for run and eval
    certificate = formats["nf4"]
    for key in ("changed", "flipped", "collateral"):
        assert certificate[key] == report["permanence"]["nf4"][key]


def test_the_report_keeps_each_runs_warnings_and_the_cli_shows_them(tmp_path, tiny_dir, capsys):
    forget = write_items(tmp_path / "f.jsonl", FACTS[:2])
    retain = tmp_path / "r.jsonl"
    retain.write_text("".join(json.dumps({"prompt": f"The currency of {c} is the", "answer": a, "choices": [a, b]}) + "\n"
                              for c, a, b in [("Japan", "yen", "euro"), ("India", "rupee", "yen")]))
    for name in ("a.json", "b.json"):  # a second run in the same process reports its warning again
        assert main(["run", "--model", tiny_dir, "--forget", forget, "--retain", str(retain), "--method", "graddiff",
                     "--out", str(tmp_path / name)]) == 0
        (message,) = json.loads((tmp_path / name).read_text())["warnings"]
        assert message.startswith("no retain prompt asks the forget prompts' relation ('The capital of ... is')")
        assert capsys.readouterr().err.count(f"mansu: warning: {message}\n") == 1


def test_a_utility_set_sharing_a_prompt_with_the_protection_set_is_refused(tokenizer):
    """MANSU's protection set joins what the edit keeps (`MansuConfig.protect`): a utility item in it is not
    untouched. Refused before any work; without protection the same sets are fine up to the run itself."""
    from conftest import make_tiny
    from mansu.report import run

    items = [mansu.Item(f"The capital of {c} is", a, (a, "Oslo", "Lima", "Rome")) for c, a in FACTS[:3]]
    anchor = mansu.data.load_anchor("general")[0]
    with pytest.raises(mansu.MansuError, match="in both the utility and the protection set"):
        run(make_tiny("llama", tokenizer), tokenizer, items[:1], items[1:], mansu.MansuConfig(progress=False),
            utility=[anchor])
    with pytest.raises(mansu.MansuError, match="`before` scores"):  # past the check: fails on a bad `before`
        run(make_tiny("llama", tokenizer), tokenizer, items[:1], items[1:],
            mansu.MansuConfig(progress=False, protect=None), utility=[anchor], before={"full": {}})


def test_utility_items_the_model_named_as_neighbours_are_reported_as_touched(tokenizer, monkeypatch):
    """`relation_neighbours` adds items the model names to the retain set inside `unlearn`: one that is also a utility
    item was kept by the edit, and the report says so (a warning) and lists what was added."""
    from conftest import make_tiny
    from mansu.report import run

    items = [mansu.Item(f"The capital of {c} is", a, (a, "Madrid", "Berlin")) for c, a in FACTS[:4]]
    named = items[3:]  # the model "names" Norway, whose capital is a utility item
    monkeypatch.setattr(mansu.pipeline, "self_neighbours", lambda *args, **kwargs: list(named))
    config = mansu.MansuConfig(relation_neighbours=1, protect=None, max_rounds=1, edits_per_round=50, exam_formats=(),
                               progress=False)
    report = run(make_tiny("llama", tokenizer), tokenizer, items[:2], items[2:3], config, utility=named)
    (message,) = report.warnings
    assert message.startswith("1 utility item(s) are among the neighbours the model named") and "Norway" in message
    assert report.named_neighbours == [{"prompt": "The capital of Norway is", "answer": "Oslo",
                                        "choices": ["Oslo", "Madrid", "Berlin"]}]
    other = [mansu.Item("The currency of Japan is the", "yen", ("yen", "euro"))]
    assert run(make_tiny("llama", tokenizer), tokenizer, items[:2], items[2:3], config, utility=other).warnings == []


def test_table_and_plot_from_reports(tmp_path, tiny_dir):
    forget, retain = write_items(tmp_path / "f.jsonl", FACTS[:2]), write_items(tmp_path / "r.jsonl", FACTS[2:])
    reports = []
    for method in ("ga", "mansu"):
        out = tmp_path / f"{method}.json"
        assert main(["run", "--model", tiny_dir, "--forget", forget, "--retain", retain, "--method", method,
                     "--out", str(out)]) == 0
        reports.append(RunReport.from_json(out))
    table = comparison_table(reports)
    assert "ga" in table and "mansu" in table and "PTQ gap nf4" in table
    png = plot_update_ratios(reports, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "forget_full" in repr(reports[1]) and "<table>" in reports[1]._repr_html_()
