"""mansu.quant and mansu.floor on every device in DEVICES, in fp32, bf16 and fp16.

On meta (no GPU needed) a table made on the CPU and met by a weight elsewhere raises, so these tests catch
device bugs here; on cuda every result must also equal the CPU's, value for value. Ops whose output shape
depends on the data (`nonzero`, `Tensor.item()`) have no meta kernel: the tests that reach them are marked
xfail on meta, naming the op, and their largest data-independent piece is tested on its own.
"""
import warnings
from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mansu import quant
from mansu.floor import _plan_moves, apply_floor_, floor_update
from mansu.quant import certificate

from conftest import DEVICES, boundary_heavy_edit, tiny_config
from test_quant import bnb_codes, bnb_dequant, bnbf, library_codes

pytestmark = pytest.mark.device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR_FORMATS = ["nf4", "fp4", "nf4-dq"]


class OneDevice(TorchDispatchMode):
    """Fails every op whose tensor arguments lie on more than one device. Meta kernels do not all check
    (`bucketize` takes CPU boundaries for meta values); copies between devices and 0-dim CPU tensors (which
    torch takes as scalars) are allowed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1 and func is not torch.ops.aten.copy_.default:
            raise RuntimeError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@pytest.fixture(params=DEVICES)
def device(request) -> Iterator[str]:
    """The device under test; on meta every op also runs under `OneDevice` (real devices check themselves)."""
    if request.param != "meta":
        yield request.param
        return
    with OneDevice():
        yield request.param


def no_meta_kernel(request, device: str, op: str, raises: type[Exception]) -> None:
    """Expect this test to fail on meta, and only with `raises`: `op` has no meta kernel."""
    reason = f"{op} has no meta kernel: its result depends on the data"
    request.applymarker(pytest.mark.xfail(device == "meta", reason=reason, raises=raises, strict=True))


def edit(dtype: torch.dtype, shape: tuple[int, ...] = (33, 96), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU weight (33x96: whole 32-blocks per row, 64-blocks ending in a padded tail) and an edit of it
    that changes a third of its weights and one block's absmax."""
    gen = torch.Generator().manual_seed(seed)
    before = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    mask = torch.rand(shape, generator=gen) < 0.3
    after = torch.where(mask, before + (torch.randn(shape, generator=gen) * 0.01).to(dtype), before)
    after[5, 7] = 1.0
    return before, after


def assert_same(got: torch.Tensor, cpu: torch.Tensor, device: str, exact: bool = True) -> None:
    """`got` lies on `device` with the CPU result's shape and dtype; off meta it also holds its values
    (`exact=False`: up to the device's summation order, for double quantization's mean)."""
    assert got.device.type == device and got.shape == cpu.shape and got.dtype == cpu.dtype
    if device == "meta":
        return
    if exact:
        assert torch.equal(got.cpu(), cpu)
    else:
        torch.testing.assert_close(got.cpu(), cpu, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_encode_decode_and_fake_quantize_follow_the_weight(device, fmt, dtype):
    w, _ = edit(dtype)
    enc, ref = quant.encode(w.to(device), fmt), quant.encode(w, fmt)
    assert_same(enc.codes, ref.codes, device)
    assert_same(enc.scale, ref.scale, device)
    assert (enc.offset is None) == (ref.offset is None)
    if ref.offset is not None:
        assert_same(enc.offset, ref.offset, device)
    exact = not quant.get_format(fmt).double_quant
    assert_same(quant.decode(enc, fmt, w.to(device)), quant.decode(ref, fmt, w), device, exact)
    assert_same(quant.fake_quantize(w.to(device), fmt), quant.fake_quantize(w, fmt), device, exact)


def test_double_quant_on_the_device_leaves_bitsandbytes_working_on_the_cpu(device, monkeypatch):
    """bitsandbytes keeps the 8-bit map of the first double quantization in a process, on that call's device
    (a meta map could never be read back): mansu passes its own map, so a first call elsewhere leaves it unset."""
    monkeypatch.delitem(bnbf.name2qmap, "dynamic", raising=False)  # as in a fresh process
    w, _ = edit(torch.float32)
    quant.fake_quantize(w.to(device), "nf4-dq")
    assert torch.equal(quant.fake_quantize(w, "nf4-dq"), bnb_dequant(w, "nf4", True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_4bit_codes_match_bitsandbytes_on_the_device(device, qt, dtype):
    """Against bitsandbytes' own quantizer on the same device (on meta its fake kernel: shapes only)."""
    w, _ = edit(dtype)
    w.view(-1)[5] = w.view(-1)[:64].abs().max() * float(quant.get_format(qt).midpoints()[9])  # a boundary
    codes, absmax = bnb_codes(w.to(device), qt)
    enc = quant.encode(w.to(device), qt)
    assert enc.scale.device == absmax.device and enc.scale.shape == absmax.shape
    if device != "meta":
        assert torch.equal(enc.scale.cpu(), absmax.cpu())
        assert torch.equal(library_codes(quant.Encoded(enc.codes.cpu(), enc.scale), qt, w.numel()), codes.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_bin_geometry_follows_the_weight(device, fmt, dtype):
    w, _ = edit(dtype)
    got, ref = quant.bin_geometry(w.to(device), fmt), quant.bin_geometry(w, fmt)
    for name in ("code", "scale", "down", "up"):
        assert_same(getattr(got, name), getattr(ref, name), device)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_codes_at_scale_follows_the_blocks(device, qt, tail):
    w, _ = edit(torch.float32, (32, 64))
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1) * 1.5  # a scale other than the blocks' own
    fmt = quant.get_format(qt)
    got = quant.codes_at_scale(fmt, blocks.to(device), absmax.to(device), tail)
    assert_same(got, quant.codes_at_scale(fmt, blocks, absmax, tail), device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_check_flip_counts_follow_the_blocks(device, fmt, dtype):
    """The eager counting `check` runs per tensor, on the blocks an edit touched (selecting them needs
    `nonzero`: here all blocks)."""
    f = quant.get_format(fmt)
    before, after = edit(dtype)
    (b, tail), (a, _) = quant.to_blocks(before, f), quant.to_blocks(after, f)
    got = certificate._flip_counts(f, b.to(device), a.to(device), tail, fused=False)
    assert_same(got, certificate._flip_counts(f, b, a, tail, fused=False), device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_fused_flip_counts_follow_the_blocks(device, qt, dtype, monkeypatch):
    """The fused kernel on weights placed on decision boundaries: compiled on cuda (where Triton's division
    must round as eager's does), run eagerly on meta, where there is nothing to compile for."""
    if device == "meta":
        monkeypatch.setattr(certificate, "_fused_kernel", certificate._absmax_counts)
    f = quant.get_format(qt)
    before, after = boundary_heavy_edit(qt, dtype, 0.3)
    (b, tail), (a, _) = quant.to_blocks(before, f), quant.to_blocks(after, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the compiled kernel ran, no eager fallback
        got = certificate._flip_counts(f, b.to(device), a.to(device), tail, fused=True)
    assert_same(got, certificate._flip_counts(f, b, a, tail, fused=False), device)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_check_on_the_device_equals_the_cpu(device, fmt, dtype, fused, request, monkeypatch):
    no_meta_kernel(request, device, "aten::nonzero (the blocks an edit touched)", NotImplementedError)
    if fused and not quant.get_format(fmt).absmax_scaled:
        pytest.skip(f"{fmt} has no fused kernel")
    if fused:
        monkeypatch.setattr(certificate, "_FUSED_MIN_BLOCKS", 100)
    before, after = boundary_heavy_edit(fmt, dtype, 0.3) if fused else edit(dtype)
    got = quant.check({"w": before.to(device)}, {"w": after.to(device)}, fmt, layout={"w": False})[fmt]
    ref = quant.check({"w": before}, {"w": after}, fmt, layout={"w": False})[fmt]
    assert got.ratio_sample.device.type == "cpu" and got.flipped > 0
    assert got.to_dict() == ref.to_dict()


@pytest.mark.parametrize("mode", ["snap", "margin"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FLOOR_FORMATS)
def test_floor_plan_follows_the_blocks(device, fmt, dtype, mode):
    """The floor's data-independent step, on every block (`floor_update` selects touched ones by `nonzero`)."""
    f = quant.get_format(fmt)
    before, after = edit(dtype, (32, 64))
    b, a = quant.to_blocks(before, f)[0], quant.to_blocks(after, f)[0]
    absmax = b.abs().amax(1, keepdim=True)
    got = _plan_moves(f, b.to(device), a.to(device), absmax.to(device), False, 0.1, mode)
    for g, r in zip(got, _plan_moves(f, b, a, absmax, False, 0.1, mode)):
        assert_same(g, r, device)


@pytest.mark.parametrize("mode", ["snap", "margin"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FLOOR_FORMATS)
def test_floor_update_on_the_device_equals_the_cpu(device, fmt, dtype, mode, request):
    no_meta_kernel(request, device, "aten::nonzero (the blocks an edit touched)", NotImplementedError)
    before, after = edit(dtype)
    got = floor_update(before.to(device), after.to(device), fmt, mode=mode)
    assert_same(got, floor_update(before, after, fmt, mode=mode), device)


def tiny_model(arch: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A seeded 2-layer model of `arch` in `dtype` on `device` (the same weights on every device)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, 256), dtype=dtype).to(device).eval()


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_floor_on_the_device_equals_the_cpu(device, dtype, request):
    no_meta_kernel(request, device, "Tensor.item() (counting changed weights)", RuntimeError)
    out = {}
    for dev in (device, "cpu"):
        model = tiny_model("llama", dtype, dev)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        name = "model.layers.0.mlp.down_proj.weight"
        with torch.no_grad():
            model.get_parameter(name).mul_(1.001)
        stats = apply_floor_(model, original)
        out[dev] = stats.to_dict(), model.get_parameter(name).data
    assert out[device][0] == out["cpu"][0] and out["cpu"][0]["kept"] > 0
    assert_same(out[device][1], out["cpu"][1], device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq", "fp4", "int8", "q4_0"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, quantized transposed
def test_fake_quantized_copy_follows_the_model(device, arch, fmt, dtype):
    got = quant.quantized_copy(tiny_model(arch, dtype, device), fmt).state_dict()
    ref = quant.quantized_copy(tiny_model(arch, dtype, "cpu"), fmt).state_dict()
    assert got.keys() == ref.keys()
    exact = not quant.get_format(fmt).double_quant
    for name, value in got.items():
        assert_same(value, ref[name], device, exact)
