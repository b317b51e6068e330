import pytest
import torch

import mansu
import mansu.relation
from mansu.data import Item
from mansu.relation import _first_name, name_subjects, self_neighbours, subjects_of

FORGET = [Item(f"The capital of {c} is", a, (a, "Oslo", "Rome", "Cairo")) for c, a in
          [("France", "Paris"), ("Peru", "Lima"), ("South Korea", "Seoul")]]


def scripted(model, tokenizer, continuations: list[str]):
    """`model` whose `generate` appends each continuation in turn (the real tokenizer's ids), not a sample."""
    queue = list(continuations)

    def generate(input_ids, **kwargs):
        ids = tokenizer(queue.pop(0), add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, ids.to(input_ids.device)], dim=1)

    model.generate = generate
    return model


def test_the_subjects_are_the_words_each_forget_prompt_puts_between_the_relations_template():
    assert subjects_of(FORGET) == (("The capital of", "is"), ["France", "Peru", "South Korea"])
    assert subjects_of(FORGET[:1]) is None  # one prompt: nothing varies, no relation


def test_a_named_subject_is_the_first_entry_of_the_list_and_only_a_short_name():
    assert _first_name(" and Spain, Italy, Chile") == "Spain"
    assert _first_name(" the United Kingdom.\nIreland") == "the United Kingdom"
    for junk in (" etc, Spain", " 1990, Spain", " the process of launching a new city", "\nSpain", " #$%, Spain",
                 " among others,"):
        assert _first_name(junk) is None, junk


def test_naming_keeps_new_short_names_once_each_and_stops_at_n(tokenizer):
    from conftest import make_tiny

    model = scripted(make_tiny("llama", tokenizer), tokenizer,
                     [" and Spain, Peru", " spain,", " Peru,", " 1990,", " Chile,", " Norway,", " Iran,"])
    # "spain" repeats Spain and "Peru" is shown: the model named only three new subjects before the fourth
    assert name_subjects(model, tokenizer, ["France", "Peru"], 3) == ["Spain", "Chile", "Norway"]
    with pytest.raises(mansu.MansuError, match="at least one subject"):
        name_subjects(model, tokenizer, [], 3)


def test_naming_is_seeded_and_leaves_the_callers_random_state_alone(tokenizer):
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = name_subjects(model, tokenizer, ["France", "Peru", "Chile"], 4, seed=1, attempts_per_subject=2)
    assert first  # (this tiny model names one subject with this seed)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert name_subjects(model, tokenizer, ["France", "Peru", "Chile"], 4, seed=1, attempts_per_subject=2) == first


def test_self_neighbours_ask_the_relation_of_new_subjects_labelled_with_the_models_own_best_choice(tokenizer,
                                                                                              monkeypatch):
    from conftest import make_tiny

    model = scripted(make_tiny("llama", tokenizer), tokenizer, [" Chile,", " Spain,", " Norway,", " Iran,"])
    retain = [Item("The capital of Spain is", "Madrid", ("Madrid", "Rome"))]
    items = self_neighbours(model, tokenizer, FORGET, retain, 4, n_choices=3)
    # Spain's prompt is the user's retain item already: the other three are asked
    assert [it.prompt for it in items] == ["The capital of Chile is", "The capital of Norway is",
                                           "The capital of Iran is"]
    pool = {c for it in FORGET for c in it.choices}
    assert all(len(it.choices) == 3 and set(it.choices) <= pool for it in items)
    # the label is the model's own best choice: the model answers every one of them as labelled
    assert mansu.evaluate(model, tokenizer, items, progress=False).accuracy == 1.0
    # a large forget set's answers are scored a few rows at a time: the same labels
    monkeypatch.setattr(mansu.relation, "POOL_ROWS", 2)
    model = scripted(model, tokenizer, [" Chile,", " Spain,", " Norway,", " Iran,"])
    assert self_neighbours(model, tokenizer, FORGET, retain, 4, n_choices=3) == items
    assert self_neighbours(model, tokenizer, FORGET, retain, 0) == []
    # a broken model is an error, not arbitrary labels
    broken = scripted(make_tiny("llama", tokenizer), tokenizer, [" Chile,"])
    with torch.no_grad():
        broken.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(mansu.MansuError, match="non-finite log-likelihoods"):
        self_neighbours(broken, tokenizer, FORGET, retain, 1)
    # nothing to name: the retain set stays as given, and the user is told why
    with pytest.warns(mansu.MansuWarning, match="share no relation template"):
        assert self_neighbours(model, tokenizer, FORGET[:1], retain, 4) == []
    model = scripted(model, tokenizer, [" France,", " Peru,", " france,", " 1990,"])  # nothing new in 4 tries
    with pytest.warns(mansu.MansuWarning, match="named no new subject"):
        assert self_neighbours(model, tokenizer, FORGET, retain, 1, seed=0) == []


def test_unlearn_adds_the_self_neighbours_to_the_retain_set_and_does_not_warn_then(tokenizer, monkeypatch):
    import warnings

    from conftest import make_tiny

    seen = {}
    named = [Item("The capital of Chile is", "Oslo", ("Oslo", "Rome"))]
    monkeypatch.setattr(mansu.pipeline, "self_neighbours", lambda model, tok, forget, avoid, n, seed, progress:
                        named[:n])
    real_fisher = mansu.pipeline.diagonal_fisher
    monkeypatch.setattr(mansu.pipeline, "diagonal_fisher", lambda model, tok, retain, mask, progress: seen.update(
        retain=list(retain)) or real_fisher(model, tok, retain, mask, progress=progress))
    currencies = [Item("The currency of Japan is the", "yen", ("yen", "euro"))]
    config = mansu.MansuConfig(relation_neighbours=1, max_rounds=1, edits_per_round=50, exam_formats=(),
                               protect=None, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the relation is kept by the named neighbours: no warning
        result = mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, FORGET, currencies, config)
    assert seen["retain"] == [*currencies, *named]
    assert result.named_neighbours == named and result.summary()["named_neighbours"] == 1
    assert result.to_dict()["named_neighbours"] == [{"prompt": "The capital of Chile is", "answer": "Oslo",
                                                     "choices": ["Oslo", "Rome"]}]
    with pytest.raises(mansu.MansuError, match="relation_neighbours must be >= 0"):
        mansu.MansuConfig(relation_neighbours=-1)
