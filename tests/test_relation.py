import pytest
import torch

import mansu
import mansu.relation
from mansu.data import Item
from mansu.relation import _answer_phrase, _first_name, name_subjects, self_neighbours, subjects_of

FORGET = [Item(f"The capital of {c} is", a, (a, "Oslo", "Rome", "Cairo")) for c, a in
          [("France", "Paris"), ("Peru", "Lima"), ("South Korea", "Seoul")]]


def scripted(model, tokenizer, continuations: list[str]):
    """`model` whose `generate` appends the next continuation to each row in turn (the real tokenizer's ids,
    padded), not a sample or a greedy decode."""
    queue = list(continuations)

    def generate(input_ids, **kwargs):
        rows = [tokenizer(queue.pop(0), add_special_tokens=False).input_ids for _ in range(len(input_ids))]
        width = max(map(len, rows))
        tail = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)

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

    # named: Chile, Spain (the user's retain item asks it: not new), Norway; then the two prompts' greedy answers
    script = [" Chile,", " Spain,", " Norway,", " Santiago.\nThe", " the land of fjords and"]
    model = scripted(make_tiny("llama", tokenizer), tokenizer, script)
    retain = [Item("The capital of Spain is", "Madrid", ("Madrid", "Rome"))]
    pool = {c for it in FORGET for c in it.choices}
    items = self_neighbours(model, tokenizer, FORGET, retain, 3, n_choices=len(pool) + 1)
    # the retain set asks the relation once, so two more are named
    assert [it.prompt for it in items] == ["The capital of Chile is", "The capital of Norway is"]
    # Chile's greedy answer is a candidate too (here every candidate is a choice); Norway's was no short answer
    assert set(items[0].choices) == pool | {"Santiago"} and set(items[1].choices) == pool
    # the label is the model's own best choice: the model answers every one of them as labelled
    assert mansu.evaluate(model, tokenizer, items, progress=False).accuracy == 1.0
    # a large forget set's answers are scored a few rows at a time: the same labels
    monkeypatch.setattr(mansu.relation, "POOL_ROWS", 2)
    model = scripted(model, tokenizer, script)
    assert self_neighbours(model, tokenizer, FORGET, retain, 3, n_choices=len(pool) + 1) == items
    three = self_neighbours(scripted(model, tokenizer, script), tokenizer, FORGET, retain, 3, n_choices=3)
    assert [len(it.choices) for it in three] == [3, 3] and [it.answer for it in three] == [it.answer for it in items]
    assert self_neighbours(model, tokenizer, FORGET, retain, 0) == []
    assert self_neighbours(model, tokenizer, FORGET, retain, 1) == []  # one mate asked already: nothing to name
    # a broken model is an error, not arbitrary labels
    broken = scripted(make_tiny("llama", tokenizer), tokenizer, [" Chile,", " Santiago."])
    with torch.no_grad():
        broken.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(mansu.MansuError, match="non-finite log-likelihoods"):
        self_neighbours(broken, tokenizer, FORGET, [], 1)
    # nothing to name: the retain set stays as given, and the user is told why
    with pytest.warns(mansu.MansuWarning, match="share no relation template"):
        assert self_neighbours(model, tokenizer, FORGET[:1], retain, 4) == []
    one_answer = [Item(f"The capital of {c} is", "Paris") for c in ("France", "Peru")]
    with pytest.warns(mansu.MansuWarning, match="fewer than two answers"):  # and no naming: the script is empty
        assert self_neighbours(scripted(model, tokenizer, []), tokenizer, one_answer, [], 1) == []
    model = scripted(model, tokenizer, [" France,", " Peru,", " france,", " 1990,"])  # nothing new in 4 tries
    with pytest.warns(mansu.MansuWarning, match="named no new subject"):
        assert self_neighbours(model, tokenizer, FORGET, [], 1, seed=0) == []


def test_a_greedy_answer_is_its_first_clause_when_short():
    assert _answer_phrase(" Berlin.\n\nThe United") == "Berlin"
    assert _answer_phrase(" Washington D.C. is") == "Washington D.C"
    assert _answer_phrase(" English, and the official language") == "English"
    for junk in (" the capital city of South Africa", ' "leave" in', "\nBerlin", " ."):
        assert _answer_phrase(junk) is None, junk


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
    assert {"neighbours", "attribution"} <= set(result.timing_s)
    assert result.to_dict()["named_neighbours"] == [{"prompt": "The capital of Chile is", "answer": "Oslo",
                                                     "choices": ["Oslo", "Rome"]}]
    with pytest.raises(mansu.MansuError, match="relation_neighbours must be >= 0"):
        mansu.MansuConfig(relation_neighbours=-1)
