import copy
import random
import warnings

import pytest
import torch

import mansu
from mansu.data import Item
from mansu.quant import check

FORGET = [Item(f"The capital of {c} is", a, (a, "Oslo", "Lima", "Rome"))
          for c, a in [("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo")]]
RETAIN = [Item(f"The capital of {c} is", a, (a, "Paris", "Tokyo", "Cairo"))
          for c, a in [("Norway", "Oslo"), ("Peru", "Lima"), ("Italy", "Rome"), ("Chile", "Santiago")]]


def small_config(**kw):
    circuit = mansu.CircuitConfig(top_k=4, mass=None, steps=2, retain_penalty=1.0, progress=False)
    return mansu.MansuConfig(**{"circuit": circuit, "edits_per_round": 200, "max_rounds": 2,
                                "target_forget_acc": 0.0, "progress": False, **kw})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unlearn_edits_only_the_circuit_and_every_edit_flips(arch, tokenizer):
    from conftest import make_tiny

    model = make_tiny(arch, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config())
    mask = result.circuit.mask(model)
    changed = 0
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        assert not moved[~mask.get(name, torch.zeros_like(moved))].any(), name  # outside the circuit: bit-identical
        changed += int(moved.sum())
    assert 0 < changed == result.edited <= 2 * 200
    independent = check(before, model, ["nf4"])["nf4"]  # recomputed from scratch, all quantized weights
    assert independent.changed == independent.flipped == changed and independent.collateral == 0
    assert result.certificate.certified and 1 <= len(result.rounds) <= 2
    # the quantized twin the rounds evaluated is the model quantized from scratch
    deployed = mansu.evaluate(mansu.quantized_copy(model, "nf4"), tokenizer, FORGET, progress=False)
    assert result.rounds[-1]["forget_true_prob_nf4"] == pytest.approx(deployed.true_prob, abs=1e-6)


def test_unlearn_lowers_the_forget_likelihood(tokenizer):
    from conftest import make_tiny
    from mansu.data import encode
    from mansu.evaluation import answer_logprob

    model = make_tiny("llama", tokenizer)
    batch = encode(tokenizer, [i.prompt for i in FORGET], [i.answer for i in FORGET])
    with torch.no_grad():
        start = answer_logprob(model, batch).mean()
    mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config(energy=None))
    with torch.no_grad():
        assert answer_logprob(model, batch).mean() < start


def test_forget_variants_join_the_forget_objective_alone(tokenizer, monkeypatch):
    """`forget_variants`: the rounds' forget objective reads every generated wording too; attribution and the
    stopping rule read the items asked for."""
    from conftest import make_tiny
    from mansu.editor import Editor

    seen = {}
    attribute, run = mansu.pipeline.attribute_circuit, Editor.run

    def attribution(model, tok, forget, *args):
        seen["attribution"] = forget
        return attribute(model, tok, forget, *args)

    def rounds(editor, tok, forget, retain, grow, callback, variants):
        seen["stop"], seen["objective"] = forget, [*forget, *variants]
        return run(editor, tok, forget, retain, grow, callback, variants)

    monkeypatch.setattr(mansu.pipeline, "attribute_circuit", attribution)
    monkeypatch.setattr(Editor, "run", rounds)
    result = mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, FORGET, RETAIN,
                           small_config(forget_variants=("trim1", "quoted"), max_rounds=1))
    expected = [*FORGET, *mansu.data.prompt_variants(FORGET, ["trim1", "quoted"])]
    assert len(expected) == 3 * len(FORGET) and seen["objective"] == expected
    assert seen["attribution"] == seen["stop"] == FORGET and result.config["forget_variants"] == ("trim1", "quoted")


def test_the_protection_set_joins_every_reading_of_the_retain_set(tokenizer, monkeypatch, tmp_path):
    """`protect`: the anchor set's items, less any naming a forget answer or already in retain, join the retain set
    that the Fisher, the projector and the rounds read; None: the retain set alone."""
    from conftest import make_tiny
    from mansu.editor import Editor

    fresh = Item("The month after May is", "June", ("June", "March", "July", "May"))
    anchors = [fresh, Item("The Eiffel Tower is in", "Paris", ("Paris", "Rome", "Lima", "Oslo")), RETAIN[0]]
    mansu.data.write_jsonl(tmp_path / "anchors.jsonl", anchors)
    seen = {}
    fisher, projector, run = mansu.pipeline.diagonal_fisher, mansu.pipeline.null_space_projector, Editor.run

    def record(key, fn):
        def wrapped(model, tok, items, *args, **kw):
            seen[key] = list(items)
            return fn(model, tok, items, *args, **kw)
        return wrapped

    def rounds(editor, tok, forget, retain, *args):
        seen["rounds"] = list(retain)
        return run(editor, tok, forget, retain, *args)

    monkeypatch.setattr(mansu.pipeline, "diagonal_fisher", record("fisher", fisher))
    monkeypatch.setattr(mansu.pipeline, "null_space_projector", record("projector", projector))
    monkeypatch.setattr(Editor, "run", rounds)
    for protect, expected in ((str(tmp_path / "anchors.jsonl"), [*RETAIN, fresh]), (None, RETAIN)):
        mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, FORGET, RETAIN, small_config(protect=protect, max_rounds=1))
        assert seen["fisher"] == seen["projector"] == seen["rounds"] == expected
    with pytest.raises(mansu.MansuError, match="no anchor set 'nope'"):
        mansu.MansuConfig(protect="nope")


def test_config_and_input_errors(tokenizer):
    with pytest.raises(mansu.MansuError, match="objective"):
        mansu.MansuConfig(objective="dpo")
    with pytest.raises(mansu.MansuError, match="absmax-scaled"):
        mansu.MansuConfig(format="q8_0")
    with pytest.raises(mansu.MansuError, match="energy"):
        mansu.MansuConfig(energy=1.5)
    for bad, message in (({"retain_guard": 0.0}, "retain_guard"), ({"exam_formats": ["nf5"]}, "nf5"),
                         ({"backtracks": -1}, "backtracks"), ({"saturate_on": "twin"}, "saturate_on"),
                         ({"forget_on": "choice"}, "forget_on")):
        with pytest.raises(mansu.MansuError, match=message):
            mansu.MansuConfig(**bad)
    with pytest.raises(mansu.MansuError, match="unknown baseline"):
        mansu.BaselineConfig(method="sgd")
    with pytest.raises(mansu.MansuError, match="non-empty forget"):
        mansu.unlearn(torch.nn.Linear(2, 2), tokenizer, [], RETAIN)


def test_baselines_run_and_nan_losses_stop_with_a_clear_error(tokenizer):
    from conftest import make_tiny

    for method in ("ga", "graddiff", "npo"):
        model = make_tiny("gpt_neox", tokenizer)
        before = copy.deepcopy(model.state_dict())
        result = mansu.unlearn(model, tokenizer, FORGET, RETAIN,
                               mansu.BaselineConfig(method=method, lr=1e-3, max_steps=3, eval_every=10))
        assert result.method == method and len(result.rounds) == 3
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(mansu.MansuError, match="loss became nan at step 1"):
        mansu.unlearn(model, tokenizer, FORGET, RETAIN, mansu.BaselineConfig(max_steps=2))


def test_unlearn_warns_when_no_retain_prompt_asks_the_forgotten_relation(tokenizer):
    from conftest import make_tiny

    currencies = [Item(f"The currency of {c} is the", a, (a, "euro", "peso")) for c, a in [("Japan", "yen"),
                                                                                          ("India", "rupee")]]
    config = mansu.BaselineConfig(max_steps=1)
    with pytest.warns(UserWarning, match=r"relation \('The capital of ... is'\)"):
        mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, FORGET, currencies, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a retain prompt asks the relation of Norway: no warning
        mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, FORGET, [*currencies, RETAIN[0]], config)


def test_fisher_budget_caps_the_retain_cost_of_the_edit(tokenizer):
    from conftest import make_tiny

    free = make_tiny("llama", tokenizer)
    unbounded = mansu.unlearn(free, tokenizer, FORGET, RETAIN, small_config())
    budget = unbounded.rounds[0]["fisher_cost"] / 4
    model = make_tiny("llama", tokenizer)
    bounded = mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config(fisher_budget=budget))
    assert 0 < bounded.rounds[-1]["fisher_cost"] <= budget * (1 + 1e-6)
    assert bounded.edited < unbounded.edited and bounded.certificate.certified


def test_unlearn_leaves_the_global_rng_alone_and_repeats_under_a_seed(tokenizer):
    from conftest import make_tiny

    def run(config):
        model = make_tiny("gpt2", tokenizer)  # GPT-2 has dropout: the baselines train through it
        state, py_state = torch.get_rng_state(), random.getstate()
        mansu.unlearn(model, tokenizer, FORGET, RETAIN, config)
        assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
        return model.state_dict()

    for config in (small_config(seed=3, max_rounds=1), mansu.BaselineConfig(lr=1e-3, max_steps=2, progress=False, seed=3)):
        first, second = run(config), run(config)
        assert all(torch.equal(first[k], second[k]) for k in first)
    other = run(mansu.BaselineConfig(lr=1e-3, max_steps=2, progress=False, seed=4))
    assert any(not torch.equal(first[k], other[k]) for k in first)  # the seed drives the dropout masks


def test_callback_sees_every_round_and_can_stop_the_run(tokenizer):
    from conftest import make_tiny

    seen = []
    result = mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, FORGET, RETAIN, small_config(),
                           callback=seen.append)  # returns None: never stops
    assert seen == result.rounds and len(seen) == 2 and result.stop_reason == "max_rounds"
    seen.clear()
    result = mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, FORGET, RETAIN, small_config(),
                           callback=lambda record: seen.append(record) or True)
    assert seen == result.rounds and len(seen) == 1 and result.stop_reason == "callback"
    assert not result.converged and result.certificate.certified

    seen, model = [], make_tiny("llama", tokenizer)
    # Each item re-answered with the choice the random model prefers: it knows all of them, so the
    # forget-accuracy stop (at 0.0) does not end the run before the callback does.
    known = [next(Item(it.prompt, c, it.choices) for c in it.choices
                  if mansu.evaluate(model, tokenizer, [Item(it.prompt, c, it.choices)], progress=False).correct[0])
             for it in FORGET]
    config = mansu.BaselineConfig(lr=1e-7, max_steps=9, eval_every=2, stop_forget_acc=0.0, progress=False)
    result = mansu.unlearn(model, tokenizer, known, RETAIN, config,
                           callback=lambda record: seen.append(record) or record["round"] >= 4)
    assert [r["round"] for r in seen] == [2, 4] and len(result.rounds) == 4 and result.stop_reason == "callback"
    assert seen == [result.rounds[1], result.rounds[3]]  # the checkpoints' records, as the result keeps them


def test_the_result_says_how_the_relearning_exam_ended():
    def result(rounds, converged=True, relearn_exam=1e-4):
        return mansu.pipeline.UnlearnResult("mansu", converged, rounds, 0, 1, None, None, {}, {"relearn_exam": relearn_exam})

    passed = [{"round": 1, "relearn_recovery": 0.4}, {"round": 2, "relearn_recovery": 0.0}]
    assert result(passed).summary()["relearn_exam"] == "passed"
    assert result([passed[0] | {"relearn_exam_dropped": True}, {"round": 2}]).summary()["relearn_exam"] == "dropped"
    assert result([{"round": 1}]).summary()["relearn_exam"] == "not taken"  # one fact: nothing to attack with
    assert result(passed[:1], converged=False).summary()["relearn_exam"] == "not reached"
    assert "relearn_exam" not in result(passed, relearn_exam=None).summary()
