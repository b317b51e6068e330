"""Probes of forgetting beyond the exact prompt: paraphrases, greedy generation, the relearning attack."""
import pytest
import torch

import mansu
import mansu.quant
from mansu.data import Item
from mansu.data import encode_items
from mansu.methods import retain_loss
from mansu.probes import (fact_halves, generation_recall, held_accuracies, paraphrase_items, relearn_attack,
                          sign_attacked)

from conftest import make_tiny


class Scripted(torch.nn.Module):
    """A stand-in LM whose greedy continuation of each prompt is scripted: tests the counting alone."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.embed = torch.nn.Embedding(1, 1)  # where token ids go (mansu.models.input_device)
        self.tokenizer, self.replies, self.padding_seen = tokenizer, replies, []

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        self.padding_seen.append(bool((attention_mask[:, 0] == 0).any()))  # left padding: zeros come first
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            reply = self.tokenizer(self.replies[prompt], add_special_tokens=False).input_ids[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(reply + [pad_token_id] * (max_new_tokens - len(reply)))]))
        return torch.stack(rows)


def test_generation_recall_counts_continuations_that_start_with_the_answer(tokenizer):
    items = [Item("The capital of France is", "Paris"), Item("The capital of Peru, a country in South America, is",
                                                             "Lima"), Item("Rome is the capital of", "Italy")]
    replies = {items[0].prompt: " paris, of course", items[1].prompt: " not Lima", items[2].prompt: "\nItaly."}
    model = Scripted(tokenizer, replies)
    assert generation_recall(model, tokenizer, items, batch_size=2) == pytest.approx(2 / 3)
    assert model.padding_seen == [True, False] and tokenizer.padding_side == "right"
    with pytest.raises(mansu.MansuError):
        generation_recall(model, tokenizer, [])


def test_paraphrase_items_ask_each_fact_in_each_wording():
    items = [Item("a is", "x", ("x", "y"), ("A is", "Q: a?\nA:")), Item("b is", "y", ("x", "y"))]
    assert [(p.prompt, p.answer, p.choices) for p in paraphrase_items(items)] == [
        ("A is", "x", ("x", "y")), ("Q: a?\nA:", "x", ("x", "y"))]


def test_relearn_attack_trains_a_copy_and_scores_the_other_half(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = relearn_attack(model, tokenizer, capitals[:7], formats=("nf4",), steps=5, lr=1e-3)
    assert (result.n_train, result.n_eval) == (3, 4) and set(result.after) == {"full", "nf4"}
    assert result.train_nll[1] < result.train_nll[0]  # the attack did learn the items it trained on
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the edited model is untouched
    assert "full_after" in repr(result) and result.to_dict()["train_nll"] == list(result.train_nll)
    with pytest.raises(mansu.MansuError, match="at least 2 forget facts"):
        relearn_attack(model, tokenizer, capitals[:1])


def test_relearn_attack_reads_before_from_the_callers_scores_without_quantizing_again(tokenizer, capitals,
                                                                                      monkeypatch):
    model = make_tiny("llama", tokenizer)
    items = [*capitals[:5], Item("Its answer alone is", "x")]  # an item without choices: no flag of its own
    measured = relearn_attack(model, tokenizer, items, formats=("nf4", "q8_0"), steps=2, lr=1e-3)
    known = {"full": mansu.evaluate(model, tokenizer, items, progress=False).correct,
             **{f: mansu.evaluate(mansu.quantized_copy(model, f), tokenizer, items, progress=False).correct
                for f in ("nf4", "q8_0")}}
    copies = []
    real_copy = mansu.quant.quantized_copy
    monkeypatch.setattr(mansu.quant, "quantized_copy", lambda m, fmt: copies.append(fmt) or real_copy(m, fmt))
    read = relearn_attack(model, tokenizer, items, formats=("nf4", "q8_0"), steps=2, lr=1e-3, known=known)
    assert read.before == measured.before and read.after == measured.after
    assert copies == ["nf4", "q8_0"]  # the attacked copy's alone: "before" made none
    _, held = fact_halves(items)
    flipped = {k: [not c for c in v] for k, v in known.items()}
    assert held_accuracies(items, held, flipped, ["full"])["full"] == pytest.approx(1 - measured.before["full"])
    with pytest.raises(mansu.MansuError, match="no scores of \\['int8'\\]"):
        held_accuracies(items, held, known, ["full", "int8"])
    with pytest.raises(mansu.MansuError, match="2 flags for 5 items"):
        held_accuracies(items, held, {"full": [True, False]}, ["full"])


def test_a_sign_attack_steps_every_parameter_by_eps_down_the_answers_nll(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = encode_items(tokenizer, capitals[:4])
    attacked = sign_attacked(model, batch, 1e-3)
    with torch.no_grad():
        moved = torch.cat([(a - b).reshape(-1) for a, b in zip(attacked.parameters(), model.parameters())]).abs()
    assert (((moved - 1e-3).abs() < 1e-6) | (moved == 0)).all()  # one signed step, or none without a gradient
    assert (moved > 0).float().mean() > 0.5  # (embedding rows of tokens the batch never uses have none)
    assert all(not p.requires_grad and p.grad is None for p in attacked.parameters())
    with torch.no_grad():
        assert retain_loss(attacked, batch) < retain_loss(model, batch)  # downhill: it learns the answers again
    twice = sign_attacked(model, batch, 1e-3, steps=2)  # the gradient read again: a weight moves 0 or 2 eps
    with torch.no_grad():
        moved = torch.cat([(a - b).reshape(-1) for a, b in zip(twice.parameters(), model.parameters())]).abs()
        assert (((moved - 2e-3).abs() < 1e-6) | (moved < 1e-6)).all() and (moved > 1e-3).any()
        assert retain_loss(twice, batch) < retain_loss(attacked, batch)
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the model itself is untouched


def test_relearn_attack_seeds_its_dropout_and_leaves_the_global_rng_alone(tokenizer, capitals):
    model = make_tiny("gpt2", tokenizer)  # dropout 0.1: the attack trains through it
    state = torch.get_rng_state()
    runs = [relearn_attack(model, tokenizer, capitals[:4], formats=(), steps=2, lr=1e-3, seed=1).train_nll
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert runs[0] == runs[1]  # unseeded dropout would train the two copies differently


def test_fact_halves_keep_each_fact_whole_on_one_side(capitals):
    single = capitals[:7]  # one wording per fact: a seeded shuffle of the items, as the attack always split
    train, held = fact_halves(single, seed=2)
    assert (len(train), len(held)) == (3, 4) and sorted(train + held, key=single.index) == single
    worded = mansu.train_on_paraphrases(capitals[:6], 2)  # each fact asked three ways
    for seed in range(5):
        train, held = fact_halves(worded, seed)
        assert len(train) == len(held) == 9
        assert not {(it.answer, it.choices) for it in train} & {(it.answer, it.choices) for it in held}
    with pytest.raises(mansu.MansuError, match="at least 2 forget facts"):
        fact_halves(mansu.train_on_paraphrases(capitals[:1], 2))
