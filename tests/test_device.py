"""Devices and dtypes: bf16 models edited exactly, fp32 results from bf16 models, dispatched models left where
accelerate put them, and no host constant meeting a device tensor (meta always, cuda where present).

On CUDA the tests that run `unlearn`, `floor_update` or `quantized_copy` need the device-generic quantizers
(the quant package split); until that lands they are expected to fail there, not here.
"""
import math

import pytest
import torch

import mansu
from conftest import DEVICES, make_tiny
from mansu.attribution import ablated, interpolated, mean_activations
from mansu.components import Component, find_components
from mansu.data import Item, encode_items
from mansu.data import pad_rows, split_tokens
from mansu.evaluation import _cache_argument, _shared_prompt_logprob, answer_logprob, encode_forget, fact_logprob
from mansu.floor import floor_update
from mansu.quant import check, quantized_layout, quantized_weights
from test_pipeline import FORGET, RETAIN, small_config

pytestmark = pytest.mark.device
RUN = ["cpu"] + [d for d in DEVICES if d != "meta"]  # devices a whole computation (with results) runs on


def bf16(arch: str, tokenizer, device: str) -> torch.nn.Module:
    return make_tiny(arch, tokenizer).to(device, torch.bfloat16)


def floored_targets(before: torch.Tensor, after: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Where `floor_update` sends each weight that changed from `before`, nudged one ulp in its change's direction."""
    away = torch.where(after > before, math.inf, -math.inf).to(before)
    nudged = torch.where(after != before, torch.nextafter(before, away), before)
    floored = floor_update(quantized_layout(before, transposed), quantized_layout(nudged, transposed), "nf4")
    return quantized_layout(floored, transposed)


def assert_exact_edit(model: torch.nn.Module, before: dict[str, torch.Tensor], result) -> None:
    """Every changed weight holds exactly its floored target; the certificate holds and is recomputed."""
    changed = 0
    params = dict(model.named_parameters())
    for name, transposed in quantized_weights(model).items():
        after, was = params[name].detach(), before[name]
        moved = after != was
        changed += int(moved.sum())
        assert torch.equal(after[moved], floored_targets(was, after, transposed)[moved]), name
    assert 0 < changed == result.edited
    assert result.certificate.certified
    independent = check(before, model, ["nf4"])["nf4"]
    assert independent.flipped == independent.changed == changed and independent.collateral == 0


@pytest.mark.parametrize("device", RUN)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_unlearn_bf16_writes_the_floored_targets_exactly(arch, device, tokenizer):
    model = bf16(arch, tokenizer, device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config())
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, device)}
    assert_exact_edit(model, before, result)


@pytest.mark.parametrize("device", RUN)
def test_baseline_bf16_trains_in_place(device, tokenizer):
    model = bf16("qwen2", tokenizer, device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mansu.unlearn(model, tokenizer, FORGET, RETAIN,
                           mansu.BaselineConfig(method="npo", lr=1e-3, max_steps=3, eval_every=3))
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, device)}
    assert len(result.rounds) == 3 and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.mark.parametrize("device", RUN)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_models_give_fp32_results_close_to_fp32_models(arch, device, tokenizer):
    full = make_tiny(arch, tokenizer).to(device)
    half = bf16(arch, tokenizer, device)
    batch = encode_items(tokenizer, FORGET)
    with torch.no_grad():
        lp32, lp16 = answer_logprob(full, batch), answer_logprob(half, batch)
    assert lp16.dtype == torch.float32 and torch.allclose(lp16, lp32, rtol=0.02)
    e32, e16 = (mansu.evaluate(m, tokenizer, FORGET + RETAIN, progress=False) for m in (full, half))
    assert e16.answer_nll == pytest.approx(e32.answer_nll, rel=0.02)

    s32, s16 = (mansu.attribute(m, tokenizer, FORGET, steps=2) for m in (full, half))
    for kind in s32:
        assert s16[kind].dtype == torch.float32 and cosine(s16[kind], s32[kind]) > 0.98, kind

    mask = find_components(full).mask(full, [Component("head", 1, 0), Component("neuron", 0, 3)])
    f32, f16 = (mansu.diagonal_fisher(m, tokenizer, RETAIN, mask, progress=False) for m in (full, half))
    for name, values in f16.values.items():
        assert values.dtype == torch.float32 and values.device.type == device
        assert cosine(values, f32.values[name]) > 0.98, name

    p32, p16 = (mansu.null_space_projector(m, tokenizer, RETAIN, mask, mansu.ProjectionConfig(energy=0.9),
                                           progress=False) for m in (full, half))
    for name, layer in p16.layers.items():
        assert layer.basis.dtype == torch.float32 and layer.basis.device.type == device
        u32, u16 = p32.layers[name].basis, layer.basis
        assert u16.shape == u32.shape and cosine(u16 @ u16.T, u32 @ u32.T) > 0.98, name  # the same subspace


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_forward_paths_make_no_host_constants(arch, device, tokenizer):
    """On the meta device any tensor made on the host that meets an activation, and any copy to the host, fails."""
    model = make_tiny(arch, tokenizer)
    model.set_attn_implementation("eager")  # transformers' sdpa path reads the padding mask on the host
    model.to(device)
    batch = encode_items(tokenizer, FORGET)
    assert answer_logprob(model, batch).device.type == device
    baseline = mean_activations(model, tokenizer, RETAIN)
    assert {v.device.type for v in baseline.values()} == {device}
    baseline = {n: v.cpu() if device != "meta" else torch.zeros(v.shape) for n, v in baseline.items()}  # host-made
    comps = find_components(model)
    with ablated(model, [Component("head", 0, 1), Component("neuron", 1, 2)], baseline):
        assert answer_logprob(model, batch).device.type == device
    sites = comps.sites("head") + comps.sites("neuron")
    with interpolated(model, sites, baseline, 0.5) as seen:
        metric = answer_logprob(model, batch).sum()
        grads = torch.autograd.grad(metric, [seen[n] for n in sites])
    assert all(g.device.type == device and g.shape == seen[n].shape for g, n in zip(grads, sites))


def dispatched(tokenizer, device: str, offload_dir) -> torch.nn.Module:
    """A tiny Llama dispatched by accelerate: decoder layers on `device`, embeddings and head offloaded to disk
    (their weights on the meta device between calls, loaded by accelerate's hooks for each forward)."""
    from accelerate import dispatch_model

    main = 0 if device == "cuda" else "cpu"
    device_map = {"model.embed_tokens": "disk", "model.layers": main, "model.norm": main, "model.rotary_emb": main,
                  "lm_head": "disk"}
    return dispatch_model(make_tiny("llama", tokenizer), device_map, offload_dir=offload_dir)


@pytest.mark.parametrize("device", RUN)
def test_dispatched_model_runs_where_accelerate_put_it(device, tokenizer, tmp_path):
    model, plain = dispatched(tokenizer, device, tmp_path), make_tiny("llama", tokenizer).to(device)
    placement = {n: p.device for n, p in model.named_parameters()}
    assert model.get_input_embeddings().weight.device.type == "meta"  # what next(model.parameters()) would give
    assert mansu.evaluate(model, tokenizer, FORGET, progress=False).answer_nll == pytest.approx(
        mansu.evaluate(plain, tokenizer, FORGET, progress=False).answer_nll, rel=1e-5)
    mask = find_components(plain).mask(plain, [Component("head", 0, 2), Component("neuron", 1, 5)])
    fisher, expected = (mansu.diagonal_fisher(m, tokenizer, RETAIN, mask, progress=False) for m in (model, plain))
    for name, values in fisher.values.items():
        assert torch.allclose(values, expected.values[name], rtol=1e-4, atol=1e-12), name

    result, reference = (mansu.unlearn(m, tokenizer, FORGET, RETAIN, small_config()) for m in (model, plain))
    assert {n: p.device for n, p in model.named_parameters()} == placement  # nothing pulled onto one device
    assert result.certificate.certified and result.edited == reference.edited > 0
    edited = dict(model.named_parameters())
    for name in quantized_weights(plain):
        assert torch.equal(edited[name], dict(plain.named_parameters())[name]), name  # the same edit


@pytest.mark.parametrize("device", RUN)  # not meta: transformers reads a padded mask's values (.item()) there
def test_choices_continue_their_prompts_cache_on_the_device(tokenizer, device):
    """The shared-prompt scores run where the model is and equal whole rows' scores there."""
    model = make_tiny("llama", tokenizer).to(device)
    texts = [("The capital of France is", " Paris"), ("The capital of France is", " a long answer here"),
             ("A", " b c d")]
    rows = [split_tokens(tokenizer, prompt, answer) for prompt, answer in texts]
    shared = _shared_prompt_logprob(model, rows, tokenizer.pad_token_id, _cache_argument(type(model)))
    assert shared.device.type == torch.device(device).type
    whole = answer_logprob(model, pad_rows(rows, tokenizer.pad_token_id), by_length=False)
    assert torch.allclose(shared, whole, atol=1e-4)


def test_offloaded_weights_are_refused_for_editing(tokenizer, tmp_path):
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    plain = make_tiny("llama", tokenizer)
    mask = find_components(plain).mask(plain, [Component("neuron", 1, 5)])
    model = dispatch_model(plain, device_map, offload_dir=tmp_path)
    assert mansu.evaluate(model, tokenizer, FORGET, progress=False).n == len(FORGET)  # a forward is fine
    with pytest.raises(mansu.MansuError, match="offloaded"):
        mansu.diagonal_fisher(model, tokenizer, RETAIN, mask, progress=False)
    with pytest.raises(mansu.MansuError, match="offloaded"):
        mansu.unlearn(model, tokenizer, FORGET, RETAIN, small_config())


def test_load_model_leaves_a_dispatched_model_in_place(tokenizer, tmp_path):
    make_tiny("llama", tokenizer).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    model, tok = mansu.load_model(str(tmp_path / "tiny"), device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert model.get_input_embeddings().weight.device.type == "meta"  # still offloaded: not pulled to `device`
    assert mansu.evaluate(model, tok, FORGET, progress=False).n == len(FORGET)


@pytest.mark.slow
def test_embedded_model_in_bf16_unlearns_exactly(capitals):
    model, tokenizer = mansu.load_model(dtype="bf16")
    forget, retain = mansu.split(capitals, 3, seed=0)
    # two choices per forget item and one round: each round evaluates the forget set twice, in bf16 on a CPU
    forget = [Item(it.prompt, it.answer, (it.answer, next(c for c in it.choices if c != it.answer))) for it in forget]
    circuit = mansu.CircuitConfig(mass=0.05, steps=1, retain_penalty=1.0, progress=False)
    # exactness, not the guard or the protection set (whose 43 facts in the retain set's diagonal Fisher, in
    # bf16 on a CPU, were half of this test's time)
    config = mansu.MansuConfig(circuit=circuit, edits_per_round=5_000, max_rounds=1, retain_sample=6,
                               attribution_retain=3, retain_guard=None, protect=None, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # what the round lowers: the true choice's log-prob among the choices, over the items and their variants
    trained = [*forget, *mansu.data.prompt_variants(forget, config.forget_variants, avoid=retain[:6])]
    batch = encode_forget(tokenizer, trained, config.forget_on)
    with torch.no_grad():
        start = fact_logprob(model, batch).mean()
    result = mansu.unlearn(model, tokenizer, forget, retain[:6], config)
    assert_exact_edit(model, before, result)
    with torch.no_grad():
        assert fact_logprob(model, batch).mean() < start
