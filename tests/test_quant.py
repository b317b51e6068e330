"""mansu.quant against its oracles: bitsandbytes (nf4, fp4, double quant, int8) and gguf (q4_0, q4_1, q8_0)."""
import copy
import json
import warnings

import pytest
import torch

import mansu
from mansu import quant
from mansu.errors import MansuError
from mansu.quant import certificate

from conftest import boundary_heavy_edit

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 64), (33, 70), (7,), (128, 96), (3, 5, 64)]


def bnb_codes(w: torch.Tensor, qt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 4-bit codes (unpacked, flat) and block absmax of `w`."""
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=qt)
    p = packed.view(-1)
    return torch.stack([p >> 4, p & 15], 1).view(-1)[: w.numel()].long(), state.absmax


def bnb_dequant(w: torch.Tensor, qt: str, double_quant: bool) -> torch.Tensor:
    """bitsandbytes' 4-bit round trip through its torch backend (its CPU C kernel mis-decodes rows whose
    length is not a multiple of the block size; see docs/quant.md)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=double_quant)
    absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset if double_quant else st.absmax
    code = _get_4bit_code(qt, torch.device("cpu"))
    return _dequantize_4bit_compute(packed.view(-1), absmax, code, 64, w.shape, torch.float32)


def library_codes(enc: quant.Encoded, fmt: str, n: int) -> torch.Tensor:
    f = quant.get_format(fmt)
    codes = enc.codes.reshape(-1)[:n].long()
    return torch.tensor(f.library_codes)[codes] if f.library_codes else codes


def test_level_tables_are_bitsandbytes_tables():
    for name, table in [("nf4", quant.NF4_LEVELS), ("fp4", quant.FP4_CODE_TABLE)]:
        ref = bnbf.get_4bit_type(name, device="cpu")
        assert torch.equal(torch.tensor(table).view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_4bit_codes_and_values_match_bitsandbytes(dtype, shape, qt):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).to(dtype)
    w.view(-1)[3] = 0.0  # a zero, and a value sitting exactly on a decision boundary
    w.view(-1)[5] = w.view(-1)[:64].abs().max() * float(quant.get_format(qt).midpoints()[9])
    codes, absmax = bnb_codes(w, qt)
    enc = quant.encode(w, qt)
    assert torch.equal(library_codes(enc, qt, w.numel()), codes)
    assert torch.equal(enc.scale, absmax)
    for dq in (False, True):
        fmt = qt + "-dq" if dq else qt
        assert torch.equal(quant.fake_quantize(w.float(), fmt), bnb_dequant(w, qt, dq))
        assert quant.fake_quantize(w, fmt).dtype == dtype


@pytest.mark.slow
def test_embedded_model_codes_match_bitsandbytes(embedded):
    model, _ = embedded
    params = dict(model.named_parameters())
    names = quant.quantized_weights(model)
    assert len(names) == 210 and not any("embed" in n or "lm_head" in n for n in names)
    for i, name in enumerate(names):
        w = params[name].data
        for qt in ("nf4", "fp4") if i % 30 == 0 else ("nf4",):  # fp4 on one layer's worth of samples
            codes, absmax = bnb_codes(w, qt)
            enc = quant.encode(w, qt)
            assert torch.equal(library_codes(enc, qt, w.numel()), codes), name
            assert torch.equal(enc.scale, absmax), name


@pytest.mark.slow
def test_check_of_the_embedded_model_matches_bitsandbytes(embedded, monkeypatch):
    calls = spy_on_fused_kernel(monkeypatch)  # the compiled path, on 7 of the model's weights
    model, _ = embedded
    names = list(quant.quantized_weights(model))[:7]  # layer 0: every projection shape of the model
    before = {n: model.get_parameter(n).data for n in names}
    gen = torch.Generator().manual_seed(9)
    after = {n: w + 3e-3 * torch.randn(w.shape, generator=gen) * (torch.rand(w.shape, generator=gen) < 0.5)
             for n, w in before.items()}
    cert = quant.check(before, after, ["nf4", "fp4"], layout=dict.fromkeys(names, False))
    for qt in ("nf4", "fp4"):
        expected = [bnb_check(before[n], after[n], qt) for n in names]
        assert [tuple(cert[qt].per_tensor[n].values()) for n in names] == expected
        assert cert[qt].flipped > 0 and cert[qt].collateral > 0
    assert len(calls) == 14


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_gguf_formats_match_gguf(fmt):
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(1)
    w = torch.randn(16, 96) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = w[1, :32].abs()  # a block whose largest-magnitude element is positive (q4_0's d < 0)
    w[2, 5] = 0.25  # a value exactly at .5 of a step for some formats is fine either way; a large outlier
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    assert torch.equal(quant.fake_quantize(w, fmt), torch.from_numpy(ref).reshape(w.shape))


def test_int8_matches_bitsandbytes_llm_int8():
    torch.manual_seed(2)
    w = torch.randn(48, 80) * 0.05
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.half())
    enc = quant.encode(w, "int8")
    assert torch.equal(enc.codes.reshape(w.shape) - 127, cb.int())
    assert torch.equal(quant.fake_quantize(w, "int8"), bnbf.int8_vectorwise_dequant(cb, scb))


def test_unknown_format_names_the_valid_ones():
    with pytest.raises(MansuError, match="nf4.*q4_0"):
        quant.get_format("nf5")
    with pytest.raises(MansuError, match="unknown"):
        quant.parse_formats("nf4,bogus")
    assert [f.name for f in quant.parse_formats("nf4, q4_0")] == ["nf4", "q4_0"]


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "q4_0", "q4_1", "q8_0", "int8"])
def test_bin_geometry_distances_are_the_boundaries(fmt):
    torch.manual_seed(3)
    w = torch.randn(8, 64) * 0.05
    g = quant.bin_geometry(w, fmt)
    assert torch.equal(g.code, quant.encode(w, fmt).codes.reshape(w.shape))
    inner = (g.up > 1e-6) & (g.down > 1e-6) & (g.width > 0)
    # Stepping a hair short of a boundary keeps the code, a hair past it changes it (absmax held fixed by
    # choosing weights well inside their block).
    f = quant.get_format(fmt)
    if f.absmax_scaled:
        am = quant.encode(w, fmt).scale
        for sign, dist in ((1, g.up), (-1, g.down)):
            ok = inner & (w.abs() + dist < am.repeat_interleave(64).reshape(w.shape) * 0.999)
            near = quant.codes_at_scale(f, (w + sign * dist * 0.99).reshape(-1, 64), am).reshape(w.shape)
            far = quant.codes_at_scale(f, (w + sign * dist * 1.01).reshape(-1, 64), am).reshape(w.shape)
            assert torch.equal(near[ok], g.code[ok]) and (far[ok] != g.code[ok]).all()
    assert (g.width[inner] > 0).all() and (g.down >= 0).all() and (g.up >= 0).all()


def bnb_check(before: torch.Tensor, after: torch.Tensor, qt: str) -> tuple[int, int, int]:
    """changed, flipped, collateral computed directly from bitsandbytes' codes."""
    cb, _ = bnb_codes(before, qt)
    ca, _ = bnb_codes(after, qt)
    changed = (before != after).reshape(-1)
    flips = cb != ca
    return int(changed.sum()), int((flips & changed).sum()), int((flips & ~changed).sum())


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("density", [0.002, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_counts_match_bitsandbytes(qt, density, dtype):
    torch.manual_seed(4)
    before = (torch.randn(96, 160) * 0.05).to(dtype)
    after = before.clone()
    mask = torch.rand(before.shape) < density
    after[mask] += (torch.randn(int(mask.sum())) * 0.01).to(dtype)
    after[5, 7] = 1.0  # a new block absmax: the whole block rescales (collateral flips)
    cert = quant.check({"w": before}, {"w": after}, [qt], layout={"w": False})
    c = cert[qt]
    assert (c.changed, c.flipped, c.collateral) == bnb_check(before, after, qt)
    assert c.per_tensor["w"]["collateral"] == c.collateral
    assert c.collateral > 0 or density == 1.0  # a dense edit leaves no unchanged weight to flip
    assert c.fraction == pytest.approx(c.flipped / c.changed)


def spy_on_fused_kernel(monkeypatch) -> list[int]:
    """Lower the fused kernel's threshold to test sizes; returns the row counts it is called with."""
    calls, kernel = [], certificate._fused_absmax_counts

    def spy(b, a, mids):
        calls.append(len(b))
        return kernel(b, a, mids)

    monkeypatch.setattr(certificate, "_FUSED_MIN_BLOCKS", 100)
    monkeypatch.setattr(certificate, "_fused_absmax_counts", spy)
    return calls


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("density", [0.01, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_check_counts_match_bitsandbytes(qt, density, dtype, monkeypatch):
    calls = spy_on_fused_kernel(monkeypatch)
    before, after = boundary_heavy_edit(qt, dtype, density)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the compiled kernel ran, no eager fallback
        c = quant.check({"w": before}, {"w": after}, [qt], layout={"w": False})[qt]
    assert calls and certificate._fused_kernel is not certificate._absmax_counts
    assert (c.changed, c.flipped, c.collateral) == bnb_check(before, after, qt)
    assert c.flipped > 0


def test_check_warns_and_counts_eagerly_when_compiling_fails(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(certificate, "_fused_kernel", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    before, after = boundary_heavy_edit("nf4", torch.float32, 0.3)
    small = quant.check({"w": before}, {"w": after}, "nf4", layout={"w": False})["nf4"]  # under the threshold
    assert certificate._fused_kernel is None  # ... so the compiler was not touched
    calls = spy_on_fused_kernel(monkeypatch)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        c = quant.check({"w": before}, {"w": after}, "nf4", layout={"w": False})["nf4"]
    assert (c.changed, c.flipped, c.collateral) == (small.changed, small.flipped, small.collateral) \
        == bnb_check(before, after, "nf4")
    assert calls and certificate._fused_kernel is certificate._absmax_counts


def test_check_sparse_and_dense_paths_agree_for_every_format():
    torch.manual_seed(5)
    before = torch.randn(64, 128) * 0.05
    after = before.clone()
    after[3] += 0.02  # one row: the sparse path re-encodes only its blocks
    after[9, 0] = 0.5
    layout = {"w": False}
    sparse = quant.check({"w": before}, {"w": after}, list(quant.FORMATS), layout=layout)
    for name in quant.FORMATS:
        f = quant.get_format(name)
        cb, ca = quant.encode(before, f).codes, quant.encode(after, f).codes
        changed, _ = quant.to_blocks((before != after).float(), f)
        flips = cb != ca
        c = sparse[name]
        assert (c.changed, c.flipped, c.collateral) == (
            int(changed.sum()), int((flips & (changed > 0)).sum()), int((flips & (changed == 0)).sum())), name


def test_check_reports_update_to_bin_width_ratios():
    torch.manual_seed(6)
    before = torch.randn(32, 64) * 0.05
    after = before + 1e-5  # far below the bin width: nothing flips
    c = quant.check({"w": before}, {"w": after}, "nf4", layout={"w": False})["nf4"]
    g = quant.bin_geometry(before, "nf4")
    expected = (1e-5 / g.width).reshape(-1)
    assert c.flipped == 0 and c.changed == before.numel()
    assert c.ratio_quantiles["0.5"] == pytest.approx(float(expected.median()), rel=0.05)
    assert 0 < len(c.ratio_sample) <= 4096


def test_certificate_serialises_and_renders():
    torch.manual_seed(7)
    before = torch.randn(16, 64) * 0.05
    after = before.clone()
    after[0, 1] = 1.0
    cert = quant.check({"w": before}, {"w": after}, ("nf4", "q4_0"), layout={"w": False})
    d = json.loads(json.dumps(cert.to_dict(), allow_nan=False))
    for name in ("nf4", "q4_0"):
        assert {"changed", "flipped", "collateral", "fraction"} <= set(d["formats"][name])
    assert "nf4" in cert.table() and "q4_0" in cert.table()
    assert len(repr(cert)) < 300 and "<table>" in cert._repr_html_()
    assert not cert.certified and cert["nf4"].collateral > 0  # the edited weight became its block's absmax
    empty = quant.check({"w": before}, {"w": before}, "nf4", layout={"w": False})
    assert empty["nf4"].changed == 0 and json.dumps(empty.to_dict(), allow_nan=False)


def test_quantized_weights_are_what_transformers_quantizes(tiny_model, tmp_path):
    """transformers' own 4-bit load replaces exactly these modules, quantizing the layout we use."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    import bitsandbytes as bnb

    model, _ = tiny_model
    model.save_pretrained(tmp_path)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, dtype=torch.float32)
    replaced = {f"{n}.weight": m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    layout = quant.quantized_weights(model)
    assert set(replaced) == set(layout)
    params = dict(model.named_parameters())
    for name, transposed in layout.items():
        w = quant.quantized_layout(params[name].data, transposed)
        m = replaced[name]
        assert tuple(m.weight.quant_state.shape) == tuple(w.shape)
        packed = m.weight.data.view(-1)
        codes = torch.stack([packed >> 4, packed & 15], 1).view(-1)[: w.numel()].long()
        assert torch.equal(quant.encode(w, "nf4").codes.reshape(-1)[: w.numel()].long(), codes), name
    if model.config.model_type == "gpt2":
        assert all(layout.values())  # Conv1D weights are stored [in, out] and transposed before quantizing


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "nf4-dq"])
def test_fake_and_bnb_backends_agree_exactly(tiny_model, fmt):
    model, tok = tiny_model
    ids = tok(["The capital of France is Paris"], return_tensors="pt").input_ids
    with torch.no_grad():
        fake = quant.quantized_copy(model, fmt, "fake")(ids).logits
        real = quant.quantized_copy(model, fmt, "bnb")(ids).logits
        full = model(ids).logits
    if model.config.model_type == "gpt2":  # Conv1D's addmm sums in another order than bnb's linear
        torch.testing.assert_close(fake, real, rtol=0, atol=1e-5)
    else:
        assert torch.equal(fake, real)
    assert not torch.allclose(fake, full, atol=1e-4)


def test_int8_bnb_backend_is_close_to_fake(tiny_model):
    """LLM.int8 also quantizes activations (row-wise int8), so the two paths agree only approximately."""
    model, tok = tiny_model
    ids = tok(["The capital of France is Paris"], return_tensors="pt").input_ids
    with torch.no_grad():
        fake = quant.quantized_copy(model, "int8", "fake")(ids).logits
        real = quant.quantized_copy(model, "int8", "bnb")(ids).logits
    assert (fake - real).abs().max() < 0.05 * fake.abs().max()


def test_quantized_copy_leaves_the_model_alone_and_refuses_unknown_backends(tiny_model):
    model, _ = tiny_model
    before = copy.deepcopy(model.state_dict())
    quant.quantized_copy(model, "q4_0")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(MansuError, match="backend"):
        quant.quantized_copy(model, "nf4", "gpu")
    with pytest.raises(MansuError, match="q4_0"):
        quant.quantized_copy(model, "q4_0", "bnb")


def test_evaluate_formats_scores_full_precision_and_each_format(tiny_model):
    model, tok = tiny_model
    items = [mansu.Item("One two", "three", ("three", "four")), mansu.Item("Hello", "world", ("world", "there"))]
    out = quant.evaluate_formats(model, tok, items, "nf4,q4_0", progress=False)
    assert list(out) == ["full", "nf4", "q4_0"] and all(r.n == 2 for r in out.values())


def test_check_accepts_model_directories(tiny_model, tmp_path):
    model, _ = tiny_model
    edited = copy.deepcopy(model)
    name = next(iter(quant.quantized_weights(model)))
    with torch.no_grad():
        edited.get_parameter(name).view(-1)[:10] += 0.5
    model.save_pretrained(tmp_path / "a")
    edited.save_pretrained(tmp_path / "b")
    from_dirs = quant.check(tmp_path / "a", tmp_path / "b")["nf4"]
    from_models = quant.check(model, edited)["nf4"]
    assert from_dirs.to_dict() == from_models.to_dict() and from_dirs.changed == 10


@pytest.mark.slow
def test_fake_and_bnb_nf4_give_the_same_accuracy_on_the_embedded_model(embedded, capitals):
    model, tok = embedded
    items = capitals[:12]  # bitsandbytes' CPU path dequantizes every weight on every call: keep it short
    fake, real = (mansu.evaluate(quant.quantized_copy(model, "nf4", b), tok, items, progress=False)
                  for b in ("fake", "bnb"))
    assert fake.correct == real.correct
    assert fake.answer_nll == pytest.approx(real.answer_nll, abs=1e-5)
