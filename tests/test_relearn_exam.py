"""The relearning exam of the stopping rule: each half of the forget facts attacks while the other is scored."""
import pytest
import torch

from mansu.probes import fact_halves, knowledge, sign_attacked
from mansu.relearn_exam import RELEARN_STEPS, RelearnExam

from conftest import make_tiny


def exam(model, tokenizer, forget, eps=0.05, tolerance=0.0, refs=None):
    """An exam whose forget objective is a record of what it was asked for."""
    return RelearnExam(model, tokenizer, forget, eps, tolerance, seed=0,
                       chunks=lambda items, refs: [(list(items), refs)], refs=refs)


def test_the_halves_split_the_facts_their_own_way_and_each_scored_half_keeps_its_references(tokenizer, capitals):
    forget = capitals[:8]
    ex = exam(make_tiny("llama", tokenizer), tokenizer, forget, refs=torch.arange(8.0))
    (batch_a, held_a, objective_a), (batch_b, held_b, objective_b) = ex.halves
    assert sorted(held_a + held_b, key=forget.index) == forget and len(held_a) == len(held_b) == 4
    assert len(batch_a.input_ids) == len(held_b) and len(batch_b.input_ids) == len(held_a)  # each attacks the other
    assert {it.prompt for it in held_a} != {it.prompt for it in fact_halves(forget, 0)[1]}  # not the benchmark's
    for held, ((items, refs),) in ((held_a, objective_a), (held_b, objective_b)):
        assert items == held and refs.tolist() == [float(forget.index(it)) for it in held]
    assert not RelearnExam.possible(capitals[:1]) and RelearnExam.possible(capitals[:2])


def test_each_half_attacks_the_other_and_a_failing_attack_is_kept(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    for tolerance in (0.0, 0.9):
        ex = exam(model, tokenizer, capitals[:8], eps=0.02, tolerance=tolerance)
        recoveries = []
        for batch, held, _ in ex.halves:
            attacked = sign_attacked(model, batch, 0.02, RELEARN_STEPS)
            recoveries.append(knowledge(attacked, tokenizer, held).score - knowledge(model, tokenizer, held).score)
        assert 0 < max(recoveries) < 0.9  # this random model relearns some of a half: both outcomes happen
        record = {}
        passed = ex.passes(model, tokenizer, record)
        assert record["relearn_recovery"] == pytest.approx(max(recoveries))
        assert passed == (tolerance == 0.9) and (ex.failed is None) == passed
        if not passed:  # kept: the worse attack's batch, and the forget objective of the half it scored
            worst = ex.halves[recoveries.index(max(recoveries))]
            assert ex.failed[0] is worst[0] and ex.failed[1] is worst[2]


def test_a_bf16_model_is_warned_that_the_steps_round_away(tokenizer, capitals):
    with pytest.warns(UserWarning, match="torch.bfloat16"):
        exam(make_tiny("llama", tokenizer).to(torch.bfloat16), tokenizer, capitals[:4], eps=1e-4)
