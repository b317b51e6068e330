import copy
from types import SimpleNamespace

import pytest
import torch

import mansu
from mansu.data import Item, encode, pad_rows, split_tokens
from mansu.evaluation import (_cache_argument, _shared_prompt_logprob, answer_logprob, choice_scores, encode_choices,
                              encode_forget, fact_logprob)


def test_answer_logprob_matches_manual_sum_and_ignores_padding(tiny_model):
    model, tok = tiny_model
    prompts, answers = ["The capital of France is", "A"], ["Paris", "much longer answer here"]
    batch = encode(tok, prompts, answers)
    batched = answer_logprob(model, batch)
    for b in range(2):
        alone = encode(tok, prompts[b : b + 1], answers[b : b + 1])
        ids = alone.input_ids[0]
        logp = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
        start = int(alone.target_mask[0].nonzero()[0])
        manual = sum(logp[t, ids[t + 1]] for t in range(start, len(ids) - 1))
        assert torch.allclose(batched[b], manual, atol=1e-4)


class PlainForward(torch.nn.Module):
    """A causal LM whose forward takes no `logits_to_keep` (as a user's own wrapper might)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_only_answer_positions_meet_the_vocabulary_and_a_model_without_logits_to_keep_scores_the_same(tiny_model):
    """The output head sees the positions whose logits predict an answer token of some row, not the prompts; a
    forward without `logits_to_keep` gets every position's logits and the same scores."""
    from mansu.hooks import forward_hooks

    model, tok = tiny_model
    batch = encode(tok, ["The capital of France is", "The capital of the United Kingdom is"], ["Paris", "London"])
    seen = []
    with forward_hooks([(model.get_output_embeddings(), lambda module, args: seen.append(args[0].shape[1]))],
                       pre=True):
        kept = answer_logprob(model, batch, by_length=False)
        plain = answer_logprob(PlainForward(model), batch, by_length=False)
    assert seen == [int(batch.target_mask.any(0).sum()), batch.input_ids.shape[1]]
    assert seen[0] <= seen[1] // 2  # the prompts' positions were left out
    assert torch.allclose(kept, plain, atol=1e-5)


def test_rows_of_similar_length_run_apart_with_the_same_values_and_gradients(tiny_model, capitals):
    """On a CPU a batch runs as forwards over rows of similar length: each row's log-probability and the
    parameters' gradient are those of one forward over the whole padded batch, in the batch's row order. In
    float64, so that what is compared is the arithmetic, not float32's rounding of sums taken in another order."""
    model, tok = copy.deepcopy(tiny_model[0]).double(), tiny_model[1]
    items = [capitals[0], Item("A much longer question that runs on and on, about", "nothing"), *capitals[1:6]]
    batch = mansu.data.encode_items(tok, items)
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(mansu.data.length_groups(lengths, 16 * torch.get_num_threads())) > 1  # it does split
    grads = []
    for by_length in (True, False):
        model.zero_grad(set_to_none=True)
        scores = answer_logprob(model, batch, by_length=by_length)
        scores.sum().backward()
        grads.append((scores.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (grouped, grouped_grads), (whole, whole_grads) = grads
    assert torch.allclose(grouped, whole, rtol=0, atol=1e-12)
    assert len(grouped_grads) == len(whole_grads)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grouped_grads, whole_grads))


@pytest.mark.parametrize("lengths,cost,expected", [
    ([7, 3, 7, 3, 3], 0, [[1, 3, 4], [0, 2]]),  # free forwards: one per length, shortest first
    ([7, 3, 7, 3, 3], 100, [[1, 3, 4, 0, 2]]),  # dear forwards: one
    ([4, 4, 4, 4, 20], 8, [[0, 1, 2, 3], [4]]),  # 16 + 8 + 20 + 8 tokens against 100 + 8
    ([5], 16, [[0]]),
])
def test_length_groups_minimise_padded_tokens_and_forwards(lengths, cost, expected):
    assert mansu.data.length_groups(lengths, cost) == expected


def test_choices_continue_their_prompts_cache_with_the_scores_of_whole_rows(tiny_model):
    """Each distinct prompt runs once; the rows continuing it (answers of one or several tokens, prompts of other
    lengths padded beside it) score what a forward over each whole row scores (the model in float64; both read
    log-probabilities in float32)."""
    from mansu.hooks import forward_hooks

    model, tok = copy.deepcopy(tiny_model[0]).double(), tiny_model[1]
    texts = [("The capital of France is", " Paris"), ("The capital of France is", " a very long answer indeed"),
             ("A", " b"), ("The capital of France is", " Lyon"), ("A", " longer one"), ("Q: Say?\nA:", " yes")]
    rows = [split_tokens(tok, prompt, answer) for prompt, answer in texts]
    rows.append((rows[0][0][:3] + rows[0][0][4:], 3))  # a prompt that is the first one's tokens cut short
    seen = []
    with forward_hooks([(model.get_input_embeddings(), lambda module, args: seen.append(tuple(args[0].shape)))],
                       pre=True):
        shared = _shared_prompt_logprob(model, rows, tok.pad_token_id, _cache_argument(type(model)))
    whole = answer_logprob(model, pad_rows(rows, tok.pad_token_id), by_length=False)
    assert torch.allclose(shared, whole, atol=1e-5, rtol=0)
    assert seen[0][0] == 4  # four distinct prompts, each run once; then the answers longer than a token
    assert seen[1][0] == sum(len(row) - first > 1 for row, first in rows) > 1 and len(seen) == 2
    one_token = [row for row in rows if len(row[0]) - row[1] == 1]
    assert torch.allclose(_shared_prompt_logprob(model, one_token, tok.pad_token_id, _cache_argument(type(model))),
                          answer_logprob(model, pad_rows(one_token, tok.pad_token_id), by_length=False), atol=1e-5)


class NoCacheReturned(PlainForward):
    """A causal LM that takes a cache argument and positions but returns no cache (as some remote code does)."""

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None, use_cache=None):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids, attention_mask=attention_mask).logits, cache=None)


def test_answers_longer_than_a_token_run_whole_when_the_model_returns_no_cache(tiny_model):
    model, tok = tiny_model
    rows = [split_tokens(tok, "The capital of France is", " a very long answer"), split_tokens(tok, "A", " b"),
            split_tokens(tok, "The capital of France is", " Paris")]
    shared = _shared_prompt_logprob(NoCacheReturned(model), rows, tok.pad_token_id, "cache")
    assert torch.allclose(shared, answer_logprob(model, pad_rows(rows, tok.pad_token_id)), atol=1e-5)


def test_a_model_without_a_cache_argument_scores_whole_rows_alike(tiny_model):
    model, tok = tiny_model
    items = [Item("Hello", "world", ("world", "there", "friend")), Item("One two", "three", ("three", "four")),
             Item("Say", "yes")]
    cached, lengths, groups = choice_scores(model, tok, items, batch_size=4)
    plain, plain_lengths, _ = choice_scores(PlainForward(model), tok, items, batch_size=4)
    assert torch.allclose(cached, plain, atol=1e-4) and torch.equal(lengths, plain_lengths)
    assert groups == [(0, 3, 0), (3, 2, 0), (5, 1, 0)]


def test_evaluate_picks_the_highest_likelihood_choice(tiny_model):
    model, tok = tiny_model
    items = [Item("Hello", "world", ("world", "there", "friend")), Item("One two", "three", ("three", "four"))]
    result = mansu.evaluate(model, tok, items, batch_size=2, progress=False)
    for it, ok in zip(items, result.correct):
        scores = answer_logprob(model, encode(tok, [it.prompt] * len(it.choices), list(it.choices)))
        assert ok == (it.choices[int(scores.argmax())] == it.answer)
    assert result.accuracy == sum(result.correct) / 2 and 0 < result.true_prob < 1 and result.answer_nll > 0
    assert "accuracy" in repr(result) and "<table>" in result._repr_html_()


def test_fact_logprob_over_choices_is_the_log_of_evaluates_true_choice_probability(tiny_model):
    model, tok = tiny_model
    items = [Item("Hello", "there", ("world", "there", "friend")), Item("One two", "three", ("three", "four")),
             Item("Say", "yes")]  # no choices: its answer's own log-prob
    over_choices = fact_logprob(model, encode_choices(tok, items))
    answers = fact_logprob(model, encode_forget(tok, items, "answer"))
    expected = [mansu.evaluate(model, tok, [it], progress=False).true_prob for it in items[:2]]
    assert torch.allclose(over_choices[:2].exp(), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(over_choices[2], answers[2]) and torch.allclose(answers, answer_logprob(
        model, encode(tok, [it.prompt for it in items], [it.answer for it in items])))
    assert not torch.allclose(over_choices[:2], answers[:2])
    with pytest.raises(mansu.MansuError, match="forget_on"):
        encode_forget(tok, items, "choice")


def test_evaluate_rejects_nan_weights_and_empty_sets(tiny_model):
    model, tok = tiny_model
    with pytest.raises(mansu.MansuError, match="empty"):
        mansu.evaluate(model, tok, [])
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(mansu.MansuError, match="non-finite"):
        mansu.evaluate(broken, tok, [Item("a", "b", ("b", "c"))], progress=False)


def test_embedded_model_knows_its_bundled_facts(embedded):
    model, tok = embedded
    out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])  # every bundled set: test_data.py's slow test, full and NF4
