"""benchmarks/durability.py's --smoke mode runs end to end, resumes, and reports what the targets need."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import durability  # noqa: E402
import mansu  # noqa: E402


def test_the_full_suite_has_the_splits_seeds_and_ablations_the_issue_asks_for():
    splits = durability.suite()
    assert len(splits) >= 12 and {s.n for s in splits} == {5, 10, 20}
    assert any(s.others for s in splits) and any(not s.others for s in splits)  # cross- and same-domain
    planned = durability.jobs(splits, smoke=False)
    assert len({durability.job_key(j) for j in planned}) == len(planned)  # no run twice
    for split in splits:
        mine = [j for j in planned if j["split"] == split.name and not j["ablation"]]
        assert sorted(j["seed"] for j in mine if j["method"] == "mansu") == [0, 1, 2]
        assert sorted(j["method"] for j in mine if j["method"] != "mansu") == sorted(durability.BASELINES)
    # broadest evidence first: MANSU and GradDiff on every split before anything else
    head = planned[: 2 * len(splits)]
    assert {(j["split"], j["method"]) for j in head} == {(s.name, m) for s in splits for m in ("mansu", "graddiff")}
    assert {j["ablation"] for j in planned} == {None, *durability.ABLATIONS}


def test_a_split_can_train_on_paraphrases_and_probe_the_rest():
    split = {s.name: s for s in durability.suite()}["cross-capitals-20"]
    forget, retain = split.items()
    trained, same_retain = split.items(train_paraphrases=1)
    assert same_retain == retain and len(trained) == 2 * len(forget)  # every capital has paraphrases
    assert trained == mansu.train_on_paraphrases(forget, 1)


def test_failures_name_every_missed_target():
    good = {"forget_full": 0.2, "forget_worst_format": 0.3, "worst_format": "q4_0", "forget_bnb_nf4": 0.3, "ptq_gap_max": 0.0,
            "utility_drop_full": 0.01, "utility_drop_nf4": 0.0, "utility_drop_bnb_nf4": 0.02,
            "paraphrase_full": 0.4, "paraphrase_nf4": None, "certified": True}
    assert durability.failures(good) == []
    at_the_limit = good | {"utility_drop_nf4": 0.99 - 0.94}  # 0.05000000000000004: float rounding only
    assert durability.failures(at_the_limit) == []
    assert durability.failures(good | {"utility_drop_nf4": 0.99 - 0.93}) != []  # one item more is a miss
    bad = good | {"forget_bnb_nf4": 0.5, "ptq_gap_max": 0.1, "utility_drop_bnb_nf4": 0.06, "paraphrase_nf4": 0.5,
                  "certified": False}
    text = "; ".join(durability.failures(bad))
    for part in ("forget 0.20 full / 0.30 q4_0 / 0.50 bnb", "PTQ gap +0.10", "utility drop", "paraphrase nf4 0.50", "not certified"):
        assert part in text


def test_resuming_with_other_overrides_or_data_is_refused_before_any_run(tmp_path):
    job = {"split": "same-capitals-10", "method": "mansu", "seed": 0, "ablation": None, "overrides": {"backtracks": 3}}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{durability.job_key(job)}.json").write_text(json.dumps({"job": job}))
    with pytest.raises(SystemExit, match="ran with overrides {'backtracks': 3}, not {'backtracks': 1}"):
        durability.run_suite(tmp_path, False, overrides={"backtracks": 1}, only=["same-capitals-10"])
    (tmp_path / "runs" / f"{durability.job_key(job)}.json").unlink()  # a baseline's data is checked too
    baseline = {"split": "same-capitals-10", "method": "graddiff", "seed": 0, "ablation": None}
    (tmp_path / "runs" / f"{durability.job_key(baseline)}.json").write_text(json.dumps({"job": baseline}))
    with pytest.raises(SystemExit, match="graddiff.seed0.json ran with train_paraphrases 0, not 1"):
        durability.run_suite(tmp_path, False, only=["same-capitals-10"], train_paraphrases=1)
    with pytest.raises(SystemExit, match="unknown splits"):
        durability.run_suite(tmp_path, False, only=["no-such-split"])


def test_the_report_names_the_command_that_made_its_runs(tmp_path):
    def record(method, overrides=None, trained=1):
        return {"job": {"split": "s", "method": method, "seed": 0, "ablation": None, "train_paraphrases": trained}
                | ({"overrides": overrides} if overrides else {})}

    runs = [record("mansu", {"stop_on_gap": True}), record("graddiff")]
    command = f"python benchmarks/durability.py run --out {tmp_path}"
    assert durability.run_command(tmp_path, False, runs) == (
        command + " --train-paraphrases 1 --mansu '{\"stop_on_gap\": true}'")
    mixed = runs + [record("mansu", {"backtracks": 3}, trained=0)]  # no one command made these
    assert durability.run_command(tmp_path, True, mixed) == command.replace(" run ", " run --smoke ", 1)
    # a report written elsewhere than docs/results.md names its file, relative to the checkout when inside it
    elsewhere = durability.DOC.parent / "baselines.md"
    assert durability.run_command(tmp_path, True, mixed, elsewhere).endswith(" --doc docs/baselines.md")
    assert durability.run_command(tmp_path, True, mixed, durability.DOC) == durability.run_command(tmp_path, True, mixed)
    # the default folder, inside the checkout, is named as the docs name it
    assert " --out benchmarks/results/durability" in durability.run_command(durability.RUNS, False, runs)


@pytest.mark.slow
def test_smoke_run_writes_runs_results_and_resumes(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "durability.py"), "run", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert runs == ["smoke-capitals-5.graddiff.seed0.json", "smoke-capitals-5.mansu.seed0.json"]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    mansu_row = next(r for r in rows if r["job"]["method"] == "mansu")
    assert mansu_row["certified"] and 0 <= mansu_row["forget_bnb_nf4"] <= 1
    assert isinstance(mansu_row["failures"], list) and mansu_row["relearn_recovery"] is not None
    assert (tmp_path / "durability.png").read_bytes()[:4] == b"\x89PNG"
    table = durability.compare([tmp_path]).splitlines()  # headed by how the config differs from the defaults
    assert '{"max_rounds": 3}' in table[0] and table[2].startswith("| smoke-capitals-5 | ") and "missed" in table[2]
    # both runs shared one measurement of the unedited model
    assert [p.name for p in (tmp_path / "before").glob("*.json")] == ["smoke-capitals-5.json"]
    record = json.loads((tmp_path / "runs" / runs[1]).read_text())
    assert record["environment"] == durability.environment() | {"threads": record["environment"]["threads"]}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "0 runs to do" in again.stdout


def test_the_report_says_when_two_workers_cannot_finish_the_suite_in_about_two_hours():
    slow = durability.run_time(12.9 * 3600, 5.7 * 3600)
    assert "12.9 h of run time" in slow and "5.7 h of it unlearning" in slow and "6.5 h" in slow
    assert slow.endswith("about 2 hours (not met).")
    assert durability.run_time(4 * 3600, 2 * 3600).endswith("2.0 h; issue #10 asks for about 2 hours.")


def test_compare_shows_a_dash_for_what_a_run_did_not_measure(tmp_path):
    record = json.loads((durability.RUNS / "runs" / "same-languages-5.mansu.seed0.json").read_text())
    record["relearn"] = None  # a run without the relearning attack, on items without paraphrases
    for reading in record["after"].values():
        reading.pop("paraphrase_acc", None)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "same-languages-5.mansu.seed0.json").write_text(json.dumps(record))
    (row,) = durability.compare([tmp_path]).splitlines()[2:]
    assert row.startswith("| same-languages-5 | yes 0.00 / 0.00 (nf4) / 0.000 / - / - / ")


def test_a_recovery_equal_to_a_baselines_up_to_float_rounding_is_not_below_it():
    assert 1 - 1 / 3 != 2 / 3  # the same share of held-out items, reached by two subtractions
    assert durability._not_below(2 / 3, 1 - 1 / 3) and durability._not_below(1 - 1 / 3, 2 / 3)
    assert not durability._not_below(1 / 3, 2 / 3) and durability._not_below(1.0, 2 / 3)


def test_relearning_is_checked_against_the_lowest_baseline_on_the_same_split():
    rows = [{"job": {"split": s, "method": m}, "relearn_recovery": r}
            for s, m, r in [("a", "ga", 0.4), ("a", "npo", 0.2), ("a", "mansu", 0.0), ("b", "graddiff", 0.0)]]
    lowest = durability.lowest_baseline_recovery(rows)
    assert lowest == {"a": 0.2, "b": 0.0}  # MANSU's own run is no baseline
    assert durability.relearn_failure({"job": {"split": "a"}, "relearn_recovery": 0.1}, lowest) == []
    assert durability.relearn_failure({"job": {"split": "a"}, "relearn_recovery": 0.2}, lowest) == [
        "relearn recovery +0.20 >= a baseline's +0.20"]
    assert durability.relearn_failure({"job": {"split": "b"}, "relearn_recovery": 0.0}, lowest)  # a tie misses
    assert durability.relearn_failure({"job": {"split": "c"}, "relearn_recovery": 0.9}, lowest) == []  # no baseline


def test_a_folders_summary_counts_its_runs_misses_by_kind_and_its_time_against_graddiffs():
    run = {"missed": [], "converged": True, "utility_drop_nf4": 0.0, "paraphrase_full": 0.2, "paraphrase_nf4": 0.4,
           "relearn_recovery": 0.0, "unlearn_s": 30.0, "peak_mb": 1.0, "job": {"split": "a", "seed": 0}}
    worse = run | {"missed": ["utility drop 0.1", "relearn recovery +0.20 >= a baseline's +0.20"], "converged": False,
                   "utility_drop_nf4": 0.1, "unlearn_s": 120.0, "job": {"split": "b", "seed": 0}}
    graddiff = [{"job": {"split": s, "seed": 0}, "unlearn_s": t, "peak_mb": 1.0} for s, t in (("a", 10.0), ("b", 30.0))]
    line = durability._summary([run, worse], graddiff)
    assert line.startswith("every target met on 1 of 2, converged 1; NF4 utility drop 0.050 ± 0.050")
    assert "utility 1, paraphrase 0, relearn 1, forget 0, PTQ 0" in line
    assert line.endswith("time 3.50x GradDiff's (median, 3.00-4.00)")
    assert durability._summary([], graddiff) == "no run"


def test_cad_separation_is_the_auc_of_cad_for_runs_whose_nf4_model_forgot():
    rows = [{"cad": c, "cad_nf4": n, "forget_nf4": f} for c, n, f in
            [(0.3, 0.2, 0.1), (0.2, 0.25, 0.2), (0.25, 0.01, 0.8), (0.1, 0.0, 0.9)]]
    auc = durability.cad_separation(rows)
    assert auc["cad_nf4"] == 1.0  # both forgetting runs above both remembering ones
    assert auc["cad"] == 0.75  # 0.2 < 0.25: one of the four pairs in the wrong order
    assert durability.cad_separation(rows[:2]) == {}  # nothing to separate


def test_the_share_of_runs_meeting_every_target_is_also_given_per_seed():
    rows = [{"job": {"seed": seed}, "failures": failed} for seed, failed in [(0, []), (0, ["utility"]), (1, []), (2, ["x", "y"])]]
    line = durability.targets_met(rows)
    assert line.startswith("MANSU met every target on 2 of 4 runs (50%")
    assert line.endswith("Per seed: seed 0 1 of 2, seed 1 1 of 1, seed 2 0 of 1.")
    assert "Per seed" not in durability.targets_met(rows[:2])  # one seed: nothing to split
    assert not durability.targets_met([]).startswith("MANSU met")  # baselines alone: no share to claim


def test_the_split_table_puts_each_ablation_on_its_own_row_under_mansu():
    keys = ["forget_full", "forget_nf4", "forget_bnb_nf4", "forget_worst_format", "utility_drop_nf4",
            "paraphrase_full", "relearn_recovery"]
    jobs = [("ga", None, 0.5), ("mansu", "no-floor", 1.0), ("mansu", None, 0.1), ("mansu", "no-fisher", 0.2)]
    rows = [{"job": {"split": "s", "method": m, "ablation": a, "seed": 0}} | dict.fromkeys(keys, v) for m, a, v in jobs]
    names = [line.split(" | ")[1] for line in durability.split_table(rows)[2:]]
    assert names == ["mansu (1)", "mansu (no-floor) (1)", "mansu (no-fisher) (1)", "ga (1)"]


def test_a_method_has_one_colour_in_both_panels_whichever_methods_a_folder_has(tmp_path, monkeypatch):
    import matplotlib.colors
    import matplotlib.pyplot

    figures = []  # each plot's figure, kept open to read its panels
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)
    colours = []
    for methods in (["mansu", "graddiff"], ["npo", "graddiff"]):  # graddiff comes second in both
        records = [{"job": {"method": m, "ablation": None}, "forget_full": 0.1, "forget_worst_format": 0.5,
                    "update_ratio_sample": [0.001, 0.002, 1.5]} for m in methods]
        by_method = {m: [r] for m, r in zip(methods, records)}
        durability.plots(by_method, records, [tmp_path / f"{methods[0]}.png"])
        left, right = figures[-1].axes
        scatter = {c.get_label(): matplotlib.colors.to_hex(c.get_facecolor()[0]) for c in left.collections}
        handles, names = right.get_legend_handles_labels()
        hist = {n: matplotlib.colors.to_hex(h.get_facecolor()) for h, n in zip(handles, names)}
        assert scatter == hist  # the same method, the same colour, left and right
        colours.append(scatter["graddiff"])
    assert colours[0] == colours[1]  # and in every folder's plot


def test_each_run_records_the_commit_and_the_versions_it_ran_with():
    import importlib.metadata

    env = durability.environment()
    assert env["mansu_source"] == str(Path(mansu.__file__).resolve().parent)
    head = subprocess.run(["git", "-C", env["mansu_source"], "rev-parse", "HEAD"], capture_output=True, text=True)
    assert env["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert env["transformers"] == importlib.metadata.version("transformers") and env["threads"] >= 1


def test_compare_sets_each_seed_side_by_side_and_sums_over_the_shared_runs(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, seeds in zip(folders, ([0, 1, 2], [1, 2])):
        (folder / "runs").mkdir(parents=True)
        for seed in seeds:
            name = f"same-languages-5.mansu.seed{seed}.json"
            (folder / "runs" / name).write_text((durability.RUNS / "runs" / name).read_text())
    table = durability.compare(folders, seeds=(1, 2)).splitlines()
    assert [row.split(" | ")[0] for row in table[2:4]] == ["| same-languages-5 seed 1", "| same-languages-5 seed 2"]
    assert table[5] == "On the 2 runs b shares with a:"  # seed 0 was not asked for
    assert table[6].startswith("- a: every target met on ") and " of 2, converged " in table[6]
    assert durability.compare(folders).splitlines()[2].endswith(" | - |")  # seed 0 alone: b has none


def test_seeds_other_than_non_negative_integers_are_an_error_naming_the_value():
    assert durability.seed_list("0,1,2") == (0, 1, 2)
    for bad in ("0,a", "1.5", "-1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            durability.seed_list(bad)


def test_neighbours_are_the_forget_domains_items_no_set_of_a_cross_split_asks():
    import neighbours
    from mansu.report import default_utility

    split = {s.name: s for s in durability.suite()}["cross-cities-5"]
    forget, retain = split.items()
    near = neighbours.neighbours(split, forget, retain)
    domain = {it.prompt for it in mansu.load_bundled("cities")}
    asked = {it.prompt for it in [*forget, *retain]}
    assert near and all(it.prompt in domain and it.prompt not in asked for it in near)
    assert len(near) == len(domain) - len(forget)  # a cross split retains other domains: the rest of cities is left
    # the suite's utility sets leave the whole forget domain out, so none of these is scored there
    utility, names = default_utility(forget, retain)
    assert "cities" not in names and not {it.prompt for it in near} & {it.prompt for it in utility}


def test_the_neighbours_drawn_into_retain_are_k_seeded_ones_and_the_rest_are_scored():
    import neighbours

    near = mansu.load_bundled("cities")
    moved, held = neighbours.draw(near, 5)
    assert len(moved) == 5 and len(held) == len(near) - 5
    assert sorted(it.prompt for it in [*moved, *held]) == sorted(it.prompt for it in near)
    assert neighbours.draw(near, 5) == (moved, held)  # seeded: every script that draws gets the same five
    assert neighbours.draw(near, 0) == ([], near)


def test_neighbours_runs_mansu_with_the_overrides_given_and_records_them(monkeypatch):
    import neighbours
    from types import SimpleNamespace

    seen = {}
    monkeypatch.setattr(neighbours.mansu, "load_model", lambda: (None, None))
    monkeypatch.setattr(neighbours, "accuracies", lambda model, tok, sets: ({}, {}))
    monkeypatch.setattr(neighbours.mansu, "unlearn", lambda model, tok, forget, retain, config: seen.update(
        config=config) or SimpleNamespace(stop_reason="converged", rounds=[]))
    split = {s.name: s for s in durability.suite()}["cross-cities-5"]
    row = neighbours.measure(split, "mansu", overrides={"relearn_exam": 1e-4, "protect": None})
    assert seen["config"].relearn_exam == 1e-4 and seen["config"].protect is None
    assert row["overrides"] == {"relearn_exam": 1e-4, "protect": None}
    neighbours.measure(split, "mansu")
    assert seen["config"] == durability.config_for({"split": split.name, "method": "mansu", "seed": 0,
                                                    "ablation": None}, False)  # none given: the suite's config
    cmd = [sys.executable, str(ROOT / "benchmarks" / "neighbours.py"), "cross-cities-5", "--method", "graddiff",
           "--overrides", '{"relearn_exam": 1e-4}']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "--overrides changes MansuConfig fields" in proc.stderr
    proc = subprocess.run(cmd[:3] + ["--overrides", "[1]"], capture_output=True, text=True)
    assert proc.returncode == 2 and "must be a JSON object" in proc.stderr


def test_the_report_adds_the_neighbours_records_side_by_side_per_method(tmp_path):
    assert durability.neighbour_section(tmp_path) == ""  # no records: no section
    (tmp_path / "neighbours").mkdir()
    for method, after in (("mansu", 0.25), ("graddiff", 0.75)):
        row = {"split": "cross-cities-5", "method": method, "n_neighbours": 53, "stop_reason": "converged",
               "unlearn_s": 1.0, "before": {"forget": {"full": 1.0, "nf4": 1.0}, "neighbours": {"full": 1.0, "nf4": 1.0}},
               "after": {"forget": {"full": 0.0, "nf4": 0.0}, "neighbours": {"full": after, "nf4": after}}}
        (tmp_path / "neighbours" / f"{method}.jsonl").write_text(json.dumps(row) + "\n")
    lines = durability.neighbour_section(tmp_path).splitlines()
    header = next(line for line in lines if line.startswith("| split"))
    assert header.index("mansu: neighbours") < header.index("graddiff: neighbours")  # MANSU first
    row = next(line for line in lines if line.startswith("| cross-cities-5 (53)"))
    assert row.split(" | ")[2] == "1.00 -> 0.25 / 1.00 -> 0.25" and row.split(" | ")[4].startswith("1.00 -> 0.75")
    assert "mansu: the neighbours lose 0.750 in NF4" in "\n".join(lines)
