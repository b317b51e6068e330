"""The edit loop: how moves are scored, the retain guard, the quantized twin, growth and the ablation switches."""
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import mansu
from mansu.data import Item, encode_items
from mansu.editor import Editor
from mansu.fisher import diagonal_fisher
from mansu.quant import fake_quantize, quantized_layout, quantized_weights

from conftest import make_tiny


def random_editor(arch, tokenizer, capitals, dtype=torch.float32, **config):
    """An editor over a random 30% of a tiny model's quantized weights, with its retain Fisher."""
    model = make_tiny(arch, tokenizer).to(dtype)
    layout = quantized_weights(model)
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    mask = {n: torch.rand(params[n].shape, generator=gen) < 0.3 for n in layout}
    fisher = diagonal_fisher(model, tokenizer, capitals[10:20], mask, progress=False)
    return Editor(model, mask, layout, fisher, None, mansu.MansuConfig(progress=False, **config))


def test_moves_are_chosen_for_forgetting_and_retain_gains_are_never_bought(tokenizer, capitals):
    editor = random_editor("llama", tokenizer, capitals, fisher_cost=False, edits_per_round=1)
    name = next(iter(editor.mask))
    up = torch.ones(int(editor.mask[name].sum()))
    deltas = editor.candidates(name, up)
    i, j, k = (deltas > 0).nonzero()[:3, 0].tolist()
    forget = {n: torch.zeros_like(editor.original[n], dtype=torch.float32) for n in editor.mask}
    retain = copy.deepcopy(forget)
    # i: forget benefit 1; j: benefit 2 but retain harm 5; k: benefit 0.01 and a retain *gain* of 100
    for entry, benefit, harm in ((i, 1.0, 0.0), (j, 2.0, 5.0), (k, 0.01, -100.0)):
        forget[name][entry] = -benefit / deltas[entry]
        retain[name][entry] = harm / deltas[entry]
    directions = {n: -g for n, g in forget.items()}
    (moves,) = editor.propose(forget, retain, directions).values()
    assert moves.nonzero()[:, 0].tolist() == [i]  # the summed-loss ranking would take k (100.01) first
    editor.edits_per_round = 3
    (moves,) = editor.propose(forget, retain, directions).values()
    assert moves.nonzero()[:, 0].tolist() == sorted([i, k])  # j's harm outweighs its benefit: never taken


@pytest.mark.parametrize("arch,dtype,fmt", [("llama", torch.float32, "nf4-dq"), ("llama", torch.float32, "fp4"),
                                            ("gpt2", torch.float32, "nf4-dq"), ("llama", torch.bfloat16, "nf4")])
def test_the_quantized_twin_is_exactly_the_quantized_edited_model(tokenizer, capitals, fmt, arch, dtype):
    """The twin re-encodes only touched blocks; it must equal quantizing the whole edited model (for -dq too,
    whose second stage runs over all of a tensor's block scales)."""
    editor = random_editor(arch, tokenizer, capitals, dtype=dtype, format=fmt, objective="ga")
    forget_batch, retain_batch = encode_items(tokenizer, capitals[:4]), encode_items(tokenizer, capitals[10:14])
    for step in (1, 2):
        forget_grads, retain_grads, directions, _ = editor.gradients([(forget_batch, None, 1.0)], retain_batch, step)
        moves = editor.propose(forget_grads, retain_grads, directions)
        assert moves
        editor.apply(moves)
    twin = dict(editor.quantized.named_parameters())
    for name in editor.mask:
        t = editor.layout[name]
        expected = quantized_layout(fake_quantize(quantized_layout(editor.params[name].detach(), t), fmt), t)
        assert torch.equal(twin[name], expected), name
    assert editor.edited_count() > 0


def test_the_retain_guard_undoes_a_harmful_round_and_halves_the_next(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    original = copy.deepcopy(model.state_dict())
    forget = capitals[:4]
    retain = [Item(f"Say the word {it.answer} again:", it.answer) for it in forget]  # forgetting hurts these
    config = mansu.MansuConfig(progress=False, objective="ga", retain_weight=0.0, retain_guard=1e-6, max_rounds=3,
                               grow_mass=0.0, edits_per_round=400, target_forget_acc=0.0, backtracks=0,
                               circuit=mansu.CircuitConfig(top_k=4, mass=None, progress=False))
    result = mansu.unlearn(model, tokenizer, forget, retain, config)
    rounds = result.rounds
    assert rounds[0].get("undone") and rounds[0]["edited"] == 0
    for before, after in zip(rounds, rounds[1:]):  # each undone round halves the next one's moves
        assert after["moves"] == (before["moves"] // 2 if before.get("undone") else before["moves"])
    for r in rounds:
        assert r.get("undone", False) == (max(r["retain_nll_increase_full"], r["retain_nll_increase_nf4"]) > 1e-6)
    kept = sum(r["moves"] for r in rounds if not r.get("undone"))
    assert result.edited == kept and result.certificate["nf4"].changed == kept
    if not kept:
        assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


@pytest.mark.parametrize("both_ways", [False, True])
def test_the_retain_guard_reads_a_fall_only_both_ways(both_ways):
    """A round that lowers the retain NLL by 0.5 nats/item (the original reads 1.5) is past a 0.25 guard only when
    the guard reads both ways; a rise past it always is, and every reading is recorded."""
    config = mansu.MansuConfig(retain_guard=0.25, retain_guard_both_ways=both_ways, progress=False)
    for after, breached in (((1.0, 1.4), both_ways), ((1.6, 1.8), True), ((1.4, 1.6), False)):
        editor = SimpleNamespace(config=config, nll=lambda batch, after=after: after)
        record = {}
        assert Editor.guarded(editor, None, (1.5, 1.5), None, record) == breached
        assert record == pytest.approx({"retain_nll_increase_full": after[0] - 1.5,
                                        "retain_nll_increase_nf4": after[1] - 1.5})


def test_the_anchor_guard_undoes_a_round_that_hurts_what_neither_set_names(tokenizer, capitals, tmp_path):
    """Retain's guard is off; the anchor facts' answers start with the forget answers (Paris!, among Rome!, ...),
    so forgetting hurts them: the first round is undone, and every round's record says how far the anchor fell."""
    forget = capitals[:4]
    anchor = tmp_path / "anchor.jsonl"
    mansu.data.write_jsonl(anchor, [Item(f"Shout it: {it.prompt}", it.answer + "!", [c + "!" for c in it.choices])
                                    for it in forget])
    config = dict(progress=False, objective="ga", retain_guard=None, max_rounds=2, grow_mass=0.0,
                  edits_per_round=400, target_forget_acc=0.0, circuit=mansu.CircuitConfig(top_k=4, mass=None,
                                                                                          progress=False))
    for limit in (None, 1e-6):
        model = make_tiny("llama", tokenizer)
        result = mansu.unlearn(model, tokenizer, forget, capitals[10:16],
                               mansu.MansuConfig(anchor_guard=limit, anchor=str(anchor), **config))
        if limit is None:
            first = result.rounds[0]
            assert "anchor_drop_full" not in first and not first.get("undone") and result.edited > 0
            continue
        assert result.rounds[0]["undone"]
        for r in result.rounds:  # undone exactly when the anchor fell past the limit (retain's guard is off)
            assert r.get("undone", False) == (max(r["anchor_drop_full"], r["anchor_drop_nf4"]) > limit)
    mansu.data.write_jsonl(tmp_path / "bare.jsonl", [Item("The sky is", "blue")])
    with pytest.raises(mansu.MansuError, match="every anchor item needs choices"):
        mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, forget, capitals[10:16],
                      mansu.MansuConfig(anchor_guard=0.1, anchor=str(tmp_path / "bare.jsonl"), **config))


def test_anchor_sets_leave_out_the_forget_facts_and_bad_values_are_refused(capitals, tmp_path):
    general, countries = mansu.data.load_anchor("general"), mansu.data.load_anchor("countries")
    bundled = {it.prompt for b in mansu.bundled_sets() for it in mansu.load_bundled(b)}
    assert len(general) >= 40 and len(countries) >= 30
    assert not {it.prompt for it in [*general, *countries]} & bundled
    assert mansu.data.load_anchor("general+countries") == general + countries
    left = mansu.data.load_anchor("general", exclude=[Item("Who wrote Hamlet? It was", "Shakespeare"), general[0]])
    assert len(left) == len(general) - 2 and all(it.answer != "Shakespeare" for it in left)
    with pytest.raises(mansu.MansuError, match="no anchor set 'nope'"):
        mansu.MansuConfig(anchor_guard=0.5, anchor="nope")
    with pytest.raises(mansu.MansuError, match="no anchor set 'general\\+nope': name bundled ones \\('countries', 'general';"):
        mansu.MansuConfig(protect="general+nope")
    for bad in (0.0, 1.0):
        with pytest.raises(mansu.MansuError, match="anchor_guard must be in"):
            mansu.MansuConfig(anchor_guard=bad)
    mansu.data.write_jsonl(tmp_path / "one.jsonl", capitals[:1])
    with pytest.raises(mansu.MansuError, match="shares a prompt or an answer"):
        mansu.data.load_anchor(str(tmp_path / "one.jsonl"), exclude=capitals[:1])


def test_items_without_choices_are_forgotten_by_greedy_recall(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    forget = [Item(it.prompt, it.answer) for it in capitals[:3]]  # no choices: the stop rule uses recall
    config = mansu.MansuConfig(progress=False, max_rounds=2, edits_per_round=200,
                               circuit=mansu.CircuitConfig(top_k=4, mass=None, progress=False))
    result = mansu.unlearn(model, tokenizer, forget, capitals[10:16], config)
    assert result.rounds and all(0 <= r["forget_acc_full"] <= 1 for r in result.rounds)
    assert result.stop_reason in ("converged", "stalled", "no useful move left", "max_rounds")


def test_a_stalled_circuit_grows_and_the_result_says_why_it_stopped(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    config = mansu.MansuConfig(progress=False, max_rounds=6, patience=1, min_progress=0.99, edits_per_round=50,
                               target_forget_acc=0.0, max_growths=2, retain_guard=None,
                               circuit=mansu.CircuitConfig(mass=0.05, progress=False))
    result = mansu.unlearn(model, tokenizer, capitals[:4], capitals[10:16], config)
    grown = [r["grown_to"] for r in result.rounds if "grown_to" in r]
    assert grown and grown == sorted(grown) and result.circuit_params == grown[-1]
    assert result.circuit_params > result.circuit.n_params and len(grown) <= 2
    assert not result.converged and result.stop_reason in ("stalled", "no useful move left", "max_rounds")
    assert result.certificate.certified  # weights of the grown circuit flip their codes too
    assert "stop_reason=" in repr(result)


@pytest.mark.parametrize("falls, objective, reworded, grows", [(True, "npo", True, False), (False, "npo", True, True),
                                                             (True, "ga", True, True), (True, "npo", False, True)])
def test_with_rewordings_a_falling_npo_objective_is_progress(tokenizer, capitals, monkeypatch, falls, objective,
                                                            reworded, grows):
    """Beliefs held at 0.9 for four rounds (patience 1): with rewordings, an NPO objective falling 10% a round is
    forgetting being done, so no growth; a flat one, GA's (which never saturates), or one without rewordings (the
    items' own: their beliefs say it) grows at rounds 2 and 4."""
    import mansu.editor as editor_module
    from mansu.probes import Knowledge

    editor = random_editor("llama", tokenizer, capitals, max_rounds=4, exam_formats=(), patience=1,
                           objective=objective)
    monkeypatch.setattr(editor, "forgotten", lambda full, score: False)
    monkeypatch.setattr(editor_module, "knowledge", lambda model, tok, items: Knowledge(0.9, 0.9))
    gradients = editor.gradients

    def scripted(chunks, retain_batch, step):
        *out, losses = gradients(chunks, retain_batch, step)
        return (*out, losses | {"forget_loss": 0.9 ** step if falls else 1.0})

    monkeypatch.setattr(editor, "gradients", scripted)
    grown, rounds_seen = [], []
    variants = mansu.data.prompt_variants(capitals[:3], ["quoted"]) if reworded else ()
    rounds, _, reason = editor.run(tokenizer, capitals[:3], capitals[10:20], variants=variants,
                                   grow=lambda e: grown.append(len(rounds_seen)) or True,
                                   callback=lambda record: rounds_seen.append(record["round"]) and False)
    assert reason == "max_rounds" and len(rounds) == 4
    assert grown == ([2, 4] if grows else [])


def test_a_stall_with_no_growth_left_drops_the_rewordings_before_the_run_gives_up(tokenizer, capitals, monkeypatch):
    """No progress (patience 1), no growth: round 2 stalls and the rewordings leave the objective; round 4 stalls
    again, and the run stops there."""
    import mansu.editor as editor_module
    from mansu.probes import Knowledge

    editor = random_editor("llama", tokenizer, capitals, max_rounds=8, exam_formats=(), patience=1)
    monkeypatch.setattr(editor, "forgotten", lambda full, score: False)
    monkeypatch.setattr(editor_module, "knowledge", lambda model, tok, items: Knowledge(0.9, 0.9))
    gradients, chunks_read = editor.gradients, []

    def flat(chunks, retain_batch, step):
        chunks_read.append(len(chunks))
        *out, losses = gradients(chunks, retain_batch, step)
        return (*out, losses | {"forget_loss": 1.0})

    monkeypatch.setattr(editor, "gradients", flat)
    variants = mansu.data.prompt_variants(capitals[:3], ["quoted"])
    rounds, converged, reason = editor.run(tokenizer, capitals[:3], capitals[10:20], variants=variants)
    assert (converged, reason, len(rounds)) == (False, "stalled", 4)
    assert [r.get("rewordings_dropped", False) for r in rounds] == [False, True, False, False]
    assert chunks_read == [2, 2, 1, 1]  # the forget items' chunk, and the rewordings' while they are in


def test_a_grown_circuit_keeps_every_tensor_it_had():
    """A wider attribution may drop a component the narrower one selected; the grown circuit keeps it, so the
    projector and Fisher (computed on the grown mask) cover every weight the edit may already have moved."""
    from mansu.pipeline import union_masks

    kept = {"a": torch.tensor([True, False]), "b": torch.tensor([False, True])}
    added = {"a": torch.tensor([False, True]), "c": torch.tensor([False, False])}
    grown = union_masks(kept, added)
    assert set(grown) == {"a", "b"}  # b kept although the wider attribution dropped it; c selects nothing
    assert grown["a"].tolist() == [True, True] and grown["b"].tolist() == [False, True]


def test_without_the_floor_no_edit_crosses_a_bin(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    config = mansu.MansuConfig(progress=False, floor=False, max_rounds=2, edits_per_round=300, grow_mass=0.0,
                               retain_guard=None, circuit=mansu.CircuitConfig(top_k=4, mass=None, progress=False))
    result = mansu.unlearn(model, tokenizer, capitals[:4], capitals[10:16], config)
    nf4 = result.certificate["nf4"]
    assert nf4.changed > 0 and nf4.flipped == 0 and nf4.collateral == 0  # what quantization then undoes


def test_a_random_circuit_has_the_attributed_size(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    attributed = mansu.attribute_circuit(model, tokenizer, capitals[:4], config=mansu.CircuitConfig(top_k=3, mass=None, progress=False))
    randomized = mansu.attribute_circuit(model, tokenizer, capitals[:4],
                                         config=mansu.CircuitConfig(top_k=3, mass=None, progress=False, random=True))
    assert (randomized.heads, randomized.neurons) == (attributed.heads, attributed.neurons)
    assert randomized.components != attributed.components


def test_converged_needs_every_exam_format_and_no_ptq_gap(tokenizer, capitals):
    from mansu.probes import Knowledge

    editor = random_editor("llama", tokenizer, capitals, target_forget_acc=0.3, exam_formats=("q4_0", "fp4"),
                           stop_on_gap=True)
    assert editor.forgotten(Knowledge(0.2, 0.1), 0.2) and editor.forgotten(Knowledge(0.3, 0.1), 0.0)
    assert not editor.forgotten(Knowledge(0.2, 0.1), 0.3)  # quantization brings knowledge back: a PTQ gap
    assert not editor.forgotten(Knowledge(0.4, 0.1), 0.2)
    editor.config.stop_on_gap = False  # then each reading within the target is enough
    assert editor.forgotten(Knowledge(0.2, 0.1), 0.3) and not editor.forgotten(Knowledge(0.2, 0.1), 0.35)
    editor.config.stop_on_gap = True
    forget = capitals[:4]
    q4_0 = mansu.probes.knowledge(mansu.quantized_copy(editor.model, "q4_0"), tokenizer, forget).score
    record = {}
    passed = editor.passes_exam(tokenizer, forget, Knowledge(q4_0, 0.0), record)
    assert record["forget_acc_q4_0"] == q4_0  # each exam format scored on a copy, and recorded
    assert passed == (q4_0 <= 0.3 and record.get("forget_acc_fp4", 1.0) <= q4_0)
    assert ("forget_acc_fp4" in record) == (q4_0 <= 0.3)  # the exam stops at the first failure
    assert editor.exam_format == (None if passed else "q4_0" if q4_0 > 0.3 else "fp4")  # the next rounds read it


def test_a_round_past_a_guard_gives_back_its_weaker_half_first(tokenizer, capitals):
    editor = random_editor("llama", tokenizer, capitals, fisher_cost=False, edits_per_round=8)
    name = next(iter(editor.mask))
    deltas = editor.candidates(name, torch.ones(int(editor.mask[name].sum())))
    entries = (deltas > 0).nonzero()[:8, 0]
    forget = {n: torch.zeros_like(editor.original[n], dtype=torch.float32) for n in editor.mask}
    for rank, entry in enumerate(entries.tolist()):  # benefit 1..8
        forget[name][entry] = -(rank + 1.0) / deltas[entry]
    zeros = {n: torch.zeros_like(g) for n, g in forget.items()}
    moves = editor.propose(forget, zeros, {n: -g for n, g in forget.items()})
    weaker = editor.weaker_half(moves)
    assert weaker[name].nonzero()[:, 0].tolist() == entries[:4].tolist()  # the four lowest benefits


def test_npo_fades_on_what_the_deployed_model_still_knows(tokenizer, capitals):
    """saturate_on='quantized' is NPO's gradient with its per-item fading read on the twin: the same as plain
    NPO when the twin is the model itself, and different once the twin differs."""
    forget_batch, retain_batch = encode_items(tokenizer, capitals[:4]), encode_items(tokenizer, capitals[10:14])
    grads = {}
    for saturate_on in ("quantized", "full"):
        editor = random_editor("llama", tokenizer, capitals, saturate_on=saturate_on)
        with torch.no_grad():
            ref = mansu.answer_logprob(editor.model, forget_batch) + 0.5
        editor.quantized = editor.model  # a twin that is the model itself
        grads[saturate_on] = editor.gradients([(forget_batch, ref, 1.0)], retain_batch, 1)[0]
        if saturate_on == "quantized":
            editor.quantized = make_tiny("llama", tokenizer, seed=1)  # a twin that knows other things
            grads["other twin"] = editor.gradients([(forget_batch, ref, 1.0)], retain_batch, 1)[0]
    for name, g in grads["full"].items():
        assert torch.allclose(grads["quantized"][name], g, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(grads["other twin"][n], g, rtol=1e-3) for n, g in grads["full"].items())


@pytest.mark.parametrize("fmt", ["fp4", "nf4", "relearn"])
def test_a_failed_exam_adds_that_formats_own_gradient(tokenizer, capitals, fmt):
    """Once an exam format failed, the forget gradient is full precision's plus the same objective's on a copy in
    that format (straight through its rounding); NPO on the copy fades on the copy's own reading. For the deployed
    format (nf4) the copy is the twin, which on an unedited model is that format's copy exactly; for the relearning
    exam, the model after the failing half's sign attack."""
    from mansu.methods import forget_loss
    from mansu.probes import sign_attacked
    from mansu.relearn_exam import RELEARN_STEPS, RelearnExam

    forget_batch, retain_batch = encode_items(tokenizer, capitals[:4]), encode_items(tokenizer, capitals[10:14])
    editor = random_editor("llama", tokenizer, capitals, objective="npo", saturate_on="full", relearn_exam=1e-2)
    with torch.no_grad():
        ref = mansu.answer_logprob(editor.model, forget_batch) + 0.5
    alone = editor.gradients([(forget_batch, ref, 1.0)], retain_batch, 1)[0]
    # the relearning reading pushes the half its attack did not train on: here, the same items as the others'
    editor.relearn = RelearnExam(editor.model, tokenizer, capitals[4:8], 1e-2, 0.0, 0, lambda items, refs: [], None)
    editor.relearn.failed = (encode_items(tokenizer, capitals[4:6]), [(forget_batch, ref, 1.0)])
    editor.exam_format = fmt
    joined, _, directions, losses = editor.gradients([(forget_batch, ref, 1.0)], retain_batch, 1)
    copy_ = (sign_attacked(editor.model, editor.relearn.failed[0], 1e-2, RELEARN_STEPS) if fmt == "relearn" else
             mansu.quantized_copy(editor.model, fmt))
    params = dict(copy_.named_parameters())
    for p in params.values():
        p.requires_grad_(True)  # the attacked copy leaves its parameters without
    forget_loss(copy_, forget_batch, "npo", ref, editor.config.npo_beta).backward()
    for name, g in alone.items():
        expected = g + params[name].grad[editor.mask[name]]
        assert torch.allclose(joined[name], expected, rtol=1e-4, atol=1e-7)
        assert torch.allclose(directions[name], -expected, rtol=1e-4, atol=1e-7)  # no projector here
    assert any(not torch.allclose(joined[n], g, rtol=1e-3) for n, g in alone.items())
    with torch.no_grad():
        exam_loss = float(forget_loss(copy_, forget_batch, "npo", ref, editor.config.npo_beta))
    assert losses["forget_loss_exam"] == pytest.approx(exam_loss, rel=1e-5)
    assert all(p.grad is None for n, p in editor.params.items())  # the model's own gradients are left untouched


def test_once_full_precision_forgot_a_twin_that_still_knows_is_pushed(tokenizer, capitals, monkeypatch):
    """Full precision within the target and the twin not: NPO's push on full precision has faded, so the next
    round's forget gradient also reads the twin's own (as a failed exam's format)."""
    import mansu.editor as editor_module
    from mansu.probes import Knowledge

    editor = random_editor("llama", tokenizer, capitals, max_rounds=2, exam_formats=())
    # full precision forgot everything, the twin nothing
    monkeypatch.setattr(editor_module, "knowledge",
                        lambda model, tok, items: Knowledge(0.0, 0.0) if model is editor.model else Knowledge(1.0, 1.0))
    rounds, converged, _ = editor.run(tokenizer, capitals[:3], capitals[10:20])
    assert not converged and editor.exam_format == "nf4"
    assert "forget_loss_exam" not in rounds[0] and "forget_loss_exam" in rounds[1]


@pytest.mark.parametrize("eps,n,ends", [(0.01, 8, "dropped"), (0.1, 10, "passed")])
def test_the_relearning_exam_joins_the_stopping_rule_and_is_dropped_when_nothing_is_left_for_it(
        tokenizer, capitals, monkeypatch, eps, n, ends):
    """Forgotten in every reading but the relearning exam: each round takes the exam, a failed one makes the next
    round read the attacked copy, and a stall with no growth drops the exam (recorded) so the run ends converged."""
    editor = random_editor("llama", tokenizer, capitals, max_rounds=12, exam_formats=(), patience=1,
                           relearn_exam=eps, relearn_tolerance=0.0)
    monkeypatch.setattr(editor, "forgotten", lambda full, score: True)
    rounds, converged, reason = editor.run(tokenizer, capitals[:n], capitals[10:20])
    assert converged and reason == "converged"
    failed = [r for r in rounds if r.get("relearn_recovery", 0) > 0]
    assert failed and failed[0] is rounds[0]  # this random model relearns: the exam fails from the first round
    for record, following in zip(rounds, rounds[1:]):
        pushed = record.get("relearn_recovery", 0) > 0 and not record.get("relearn_exam_dropped")
        assert ("forget_loss_exam" in following) == pushed
    dropped = [r["round"] for r in rounds if r.get("relearn_exam_dropped")]
    if ends == "dropped":  # the exam stalled with no growth to try: dropped, and the next round passes
        assert dropped == [len(rounds) - 1] and "relearn_recovery" not in rounds[-1]
    else:  # the attacked copy's push brought the recovery down to the tolerance
        assert not dropped and len(rounds) > 1 and rounds[-1]["relearn_recovery"] <= 0
    assert all("relearn_recovery" in r for r in rounds[: len(rounds) - bool(dropped)])


def test_forgetting_over_choices_ignores_a_shift_of_every_choice_alike(tokenizer, capitals):
    """forget_on='choices': the objective reads the true choice against the other choices, so the gradient
    differs from the answer's own, and an output bias that lifts or lowers every choice's first token alike
    (answer-class suppression) leaves the objective unchanged."""
    from mansu.evaluation import encode_forget
    from mansu.methods import forget_loss

    def one_token(c: str) -> bool:
        return len(tokenizer(" " + c, add_special_tokens=False).input_ids) == 1

    forget = [Item(it.prompt, it.answer, tuple(filter(one_token, it.choices))) for it in capitals[:3]]
    editor = random_editor("llama", tokenizer, capitals, objective="ga", forget_on="choices")
    over_choices = encode_forget(tokenizer, forget, "choices")
    retain_batch = encode_items(tokenizer, capitals[10:14])
    by_choice = editor.gradients([(over_choices, None, 1.0)], retain_batch, 1)[0]
    by_answer = editor.gradients([(encode_forget(tokenizer, forget, "answer"), None, 1.0)], retain_batch, 1)[0]
    assert any(not torch.allclose(by_choice[n], g, rtol=1e-3) for n, g in by_answer.items())
    head = editor.model.get_output_embeddings()
    first = {tokenizer(" " + c, add_special_tokens=False).input_ids[0] for it in forget for c in it.choices}
    # each choice is one token, so the bias shifts every choice's log-prob by the same amount
    with torch.no_grad():
        losses = []
        for shift in (0.0, -3.0):
            bias = torch.zeros(head.out_features)
            bias[list(first)] = shift
            with head.register_forward_hook(lambda module, args, out: out + bias):
                losses.append([float(forget_loss(editor.model, b, "ga"))
                               for b in (over_choices, encode_forget(tokenizer, forget, "answer"))])
    assert losses[1][0] == pytest.approx(losses[0][0], abs=1e-4)  # over choices: unchanged
    assert losses[1][1] < losses[0][1] - 1.0  # the answer's own log-prob falls with the shift


def test_variants_join_the_forget_objective_in_turn_and_the_stop_reads_the_items(tokenizer, capitals, monkeypatch):
    """Each round's objective reads the forget items and its share of the rewordings (`in_turn`); the references
    are read once, before any move; the stopping rule reads the items alone."""
    import mansu.editor as editor_module

    editor = random_editor("llama", tokenizer, capitals, max_rounds=3, exam_formats=())
    forget, variants = capitals[:3], mansu.data.prompt_variants(capitals[:3], ["quoted", "fact"])
    seen = {"scored": [], "objective": []}
    encode, knowledge = editor_module.encode_forget, editor_module.knowledge

    def encode_spy(tok, items, mode):
        seen["objective"] += items
        return encode(tok, items, mode)

    def knowledge_spy(model, tok, items):
        seen["scored"].append(list(items))
        return knowledge(model, tok, items)

    monkeypatch.setattr(editor_module, "encode_forget", encode_spy)
    monkeypatch.setattr(editor_module, "knowledge", knowledge_spy)
    monkeypatch.setattr(editor, "forgotten", lambda full, score: False)  # a random model knows nothing to forget
    rounds, _, _ = editor.run(tokenizer, forget, capitals[10:20], variants=variants)
    picks = [variants[i] for step in range(1, len(rounds) + 1) for i in editor_module.in_turn(6, 3, step)]
    assert len(variants) == 6 and len(rounds) >= 2
    assert seen["objective"] == [*forget, *variants, *picks]
    assert seen["scored"] and all(items == forget for items in seen["scored"])
    assert rounds[0]["moves"] > 0


@pytest.mark.parametrize("n, per_round", [(20, 5), (19, 5), (7, 3), (3, 3), (1, 4)])
def test_in_turn_reads_each_rewording_once_in_every_k_rounds(n, per_round):
    """`in_turn`: about `per_round` rewordings a round, a mix of kinds (item-major order), each once per cycle."""
    from mansu.editor import in_turn

    k = -(-n // per_round)
    cycle = [in_turn(n, per_round, step) for step in range(1, k + 1)]
    assert sorted(j for picks in cycle for j in picks) == list(range(n))  # each once in k rounds
    assert all(len(picks) in (per_round - 1, per_round) or n <= per_round for picks in cycle)
    assert in_turn(n, per_round, k + 1) == cycle[0]
    if n == 20:  # four kinds of five items: round 1 reads kinds 0, 1, 2, 3, 0 of items 0..4
        assert [j % 4 for j in cycle[0]] == [0, 1, 2, 3, 0]


@pytest.mark.parametrize("forget_on", ["choices", "answer"])
def test_the_forget_gradient_in_chunks_is_the_gradient_of_the_whole_set(tokenizer, capitals, forget_on, monkeypatch):
    """The forget set runs forward and backward a chunk at a time (memory), for the same mean objective."""
    import mansu.editor as editor_module

    editor = random_editor("llama", tokenizer, capitals, forget_on=forget_on)
    retain_batch = encode_items(tokenizer, capitals[10:14])
    whole = editor.gradients(editor.chunks(tokenizer, capitals[:5]), retain_batch, 1)
    monkeypatch.setattr(editor_module, "FORGET_CHUNK", 2)
    chunks = editor.chunks(tokenizer, capitals[:5])
    assert [share for _, _, share in chunks] == [0.4, 0.4, 0.2]
    split_ = editor.gradients(chunks, retain_batch, 1)
    for name, g in whole[0].items():  # padding differs by chunk: float noise ~1e-7 on gradients ~1e-1
        assert torch.allclose(split_[0][name], g, rtol=1e-4, atol=1e-6)
        assert torch.allclose(split_[2][name], whole[2][name], rtol=1e-4, atol=1e-6)
    assert split_[3]["forget_loss"] == pytest.approx(whole[3]["forget_loss"], rel=1e-5)


def test_rewordings_weigh_as_one_mean_beside_the_forget_items_mean(tokenizer, capitals):
    """With rewordings, the objective is the items' mean plus the rewordings' mean: one mean over both would
    dilute each item's push by the number of its rewordings."""
    from mansu.evaluation import encode_forget
    from mansu.methods import forget_loss

    editor = random_editor("llama", tokenizer, capitals, objective="ga")
    forget, variants = capitals[:3], mansu.data.prompt_variants(capitals[:3], ["quoted", "fact"])
    retain_batch = encode_items(tokenizer, capitals[10:14])
    chunks = editor.chunks(tokenizer, forget) + editor.chunks(tokenizer, variants)
    both = editor.gradients(chunks, retain_batch, 1)[3]["forget_loss"]
    means = [float(forget_loss(editor.model, encode_forget(tokenizer, group, "choices"), "ga"))
             for group in (forget, variants)]
    assert len(variants) == 6 and both == pytest.approx(sum(means), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_descent_is_projected_on_the_circuit_block_alone(tokenizer, capitals, arch):
    """The rounds project each tensor's forget descent on its circuit block (a head's rows, a neuron's column):
    the same as projecting the whole weight's update and reading the mask, which the projector's tests check."""
    model = make_tiny(arch, tokenizer)
    circuit = mansu.attribute_circuit(model, tokenizer, capitals[:4],
                                      config=mansu.CircuitConfig(top_k=3, mass=None, progress=False))
    layout = quantized_weights(model)
    mask = {n: m for n, m in circuit.mask(model).items() if m.any() and n in layout}
    projector = mansu.null_space_projector(model, tokenizer, capitals[10:20], mask, progress=False)
    fisher = diagonal_fisher(model, tokenizer, capitals[10:20], mask, progress=False)
    editor = Editor(model, mask, layout, fisher, projector, mansu.MansuConfig(progress=False))
    gen = torch.Generator().manual_seed(0)
    for name, m in mask.items():
        grad = torch.randn(int(m.sum()), generator=gen)
        whole = projector.apply({name: editor.dense(name, -grad)})[name][m]
        projected = editor.direction(name, grad)
        assert torch.allclose(projected, whole, rtol=1e-4, atol=1e-6), name
        assert not torch.allclose(projected, -grad, rtol=1e-2)  # the projection removed something
    name, layer = next(iter(projector.layers.items()))  # a projector built for other columns is refused
    projector.layers[name] = dataclasses.replace(layer, columns=layer.columns[1:], basis=layer.basis[1:])
    with pytest.raises(mansu.MansuError, match="other columns than the circuit's"):
        Editor(model, mask, layout, fisher, projector, mansu.MansuConfig(progress=False))
