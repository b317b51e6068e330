"""`mansu.harden`: the guide's set and signs, what is put back, the certificate, refusals, the CLI, the callback."""
import json
from dataclasses import replace

import pytest
import torch

import mansu
from mansu.cli import main
from mansu.editor import Editor
from mansu.hardening import guide_mask
from mansu.quant import bin_geometry, quantized_layout, quantized_weights

from conftest import make_tiny

FAST = mansu.MansuConfig(progress=False, edits_per_round=100, max_rounds=2, target_forget_acc=0.0, retain_sample=4)


def unlearned(tokenizer, arch: str = "llama"):
    """A tiny model, a copy of its original state, and an 'unlearned' version: every weight nudged by noise far
    below an NF4 bin, plus a larger nudge on one norm (a weight NF4 keeps in full precision)."""
    model = make_tiny(arch, tokenizer)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-4)
    return model, original


def test_harden_moves_only_the_guides_top_weights_in_its_direction_and_certifies(tokenizer, capitals):
    model, original = unlearned(tokenizer)
    after = {n: p.detach().clone() for n, p in model.state_dict().items()}
    layout = quantized_weights(model)
    result = mansu.harden(model, original, tokenizer, capitals[:4], capitals[4:12],
                          mansu.HardenConfig(top_fraction=0.02, growths=0, edit=FAST))
    assert result.method == "harden" and result.certificate.certified and result.edited > 0
    assert mansu.check(original, model, ["nf4"])["nf4"].certified  # against the original, every weight
    state = model.state_dict()
    moved = 0
    for name in layout:
        changed = state[name] != original[name]
        # every change is a move in the guide's direction, and only the guide's top fraction could move
        guide = (after[name] - original[name])[changed]
        assert torch.equal(torch.sign(state[name] - original[name])[changed], torch.sign(guide))
        moved += int(changed.sum())
    assert moved == result.edited <= result.circuit_params <= 0.02 * sum(state[n].numel() for n in layout) + 1
    for name in set(state) - set(layout):  # what NF4 leaves in full precision keeps the user's edit
        assert torch.equal(state[name], after[name])
    # the target (forget accuracy 0) is out of reach: said so, not hidden
    assert not result.converged and "top_fraction" in result.stop_reason


def test_a_stalled_harden_doubles_its_set_and_keeps_what_moved(tokenizer, capitals):
    model, original = unlearned(tokenizer)
    layout = quantized_weights(model)
    total = sum(p.numel() for n, p in model.named_parameters() if n in layout)
    stalls = replace(FAST, max_rounds=6, patience=1, min_progress=0.99)  # every round counts as a stall
    result = mansu.harden(model, original, tokenizer, capitals[:4], capitals[4:12],
                          mansu.HardenConfig(top_fraction=0.01, growths=2, edit=stalls))
    grown = [r["grown_to"] for r in result.rounds if "grown_to" in r]
    assert len(grown) == 2 and grown[0] < grown[1] == result.circuit_params
    assert grown[1] <= 0.04 * total + 1 and grown[0] > 0.01 * total  # the top 2x, then 4x, fraction
    assert result.certificate.certified and mansu.check(original, model, ["nf4"])["nf4"].certified
    assert "0.04" in result.stop_reason  # the widest set is the one named


def test_descent_moves_inside_the_guides_set_the_forget_objectives_way(tokenizer, capitals):
    model, original = unlearned(tokenizer)
    after = {n: p.detach().clone() for n, p in model.state_dict().items()}
    layout = quantized_weights(model)
    result = mansu.harden(model, original, tokenizer, capitals[:4], capitals[4:12],
                          mansu.HardenConfig(top_fraction=0.02, growths=0, direction="descent", edit=FAST))
    state = model.state_dict()
    against = sum(int((torch.sign(state[n] - original[n]) == -torch.sign(after[n] - original[n]))
                      [state[n] != original[n]].sum()) for n in layout)
    assert against > 0  # the guide (noise here) says where; the descent, not the guide's sign, says which way
    assert result.edited > 0 and result.certificate.certified
    assert mansu.check(original, model, ["nf4"])["nf4"].certified
    assert result.edited <= result.circuit_params <= 0.02 * sum(original[n].numel() for n in layout) + 1


def test_guide_set_is_the_largest_update_per_bin_width(tokenizer):
    model, original = unlearned(tokenizer)
    layout = quantized_weights(model)
    name = next(iter(layout))
    with torch.no_grad():  # one weight moved by half its bin: it must rank first
        w = quantized_layout(original[name], layout[name])
        width = quantized_layout(bin_geometry(w).width, layout[name])
        dict(model.named_parameters())[name][3, 5] = original[name][3, 5] - 0.5 * width[3, 5]
    mask, sign = guide_mask(model, original, layout, mansu.HardenConfig(top_fraction=1e-5))
    assert list(mask) == [name] and int(mask[name].sum()) == 1 and mask[name][3, 5]
    assert sign[name].tolist() == [-1.0]
    total = sum(p.numel() for n, p in model.named_parameters() if n in layout)
    mask, _ = guide_mask(model, original, layout, mansu.HardenConfig(top_fraction=0.01, rank_by="magnitude"))
    assert abs(sum(int(m.sum()) for m in mask.values()) - 0.01 * total) <= 1


def test_editor_follows_a_given_guide(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    layout = quantized_weights(model)
    params = dict(model.named_parameters())
    mask = {n: torch.rand(params[n].shape, generator=torch.Generator().manual_seed(0)) < 0.1 for n in layout}
    fisher = mansu.diagonal_fisher(model, tokenizer, capitals[4:8], mask, progress=False)
    guide = {n: torch.randn(params[n].shape) for n in layout}  # dense: flattened over the mask
    editor = Editor(model, mask, layout, fisher, None, replace(FAST, objective="ga"), guide)
    batch = mansu.data.encode_items(tokenizer, capitals[:4])
    _, _, directions, _ = editor.gradients([(batch, None, 1.0)], mansu.data.encode_items(tokenizer, capitals[4:8]), 1)
    for n in layout:
        assert torch.equal(directions[n], guide[n][mask[n]])


@pytest.mark.parametrize("bad", [dict(top_fraction=0.0), dict(top_fraction=1.5), dict(rank_by="size"), dict(growths=-1),
                                 dict(direction="up"),
                                 dict(edit={"max_rounds": 0}), dict(edit={"no_such": 1}), dict(top_fraction="a")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(mansu.MansuError):
        mansu.HardenConfig(**bad)


def test_refuses_an_unchanged_model_and_an_incomplete_original(tokenizer, capitals):
    model = make_tiny("llama", tokenizer)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(mansu.MansuError, match="nothing to harden"):
        mansu.harden(model, original, tokenizer, capitals[:4], capitals[4:8])
    name = next(iter(quantized_weights(model)))
    with pytest.raises(mansu.MansuError, match="lacks"):
        mansu.harden(model, {k: v for k, v in original.items() if k != name}, tokenizer, capitals[:4], capitals[4:8])


def test_cli_hardens_saved_models_and_checks_outputs_first(tmp_path, tokenizer, capitals, capsys):
    model, original = unlearned(tokenizer)
    mansu.save_model(model, tokenizer, tmp_path / "after")
    model.load_state_dict(original)
    mansu.save_model(model, tokenizer, tmp_path / "before")
    mansu.data.write_jsonl(tmp_path / "f.jsonl", capitals[:4])
    mansu.data.write_jsonl(tmp_path / "r.jsonl", capitals[4:12])
    args = ["harden", "--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"),
            "--forget", str(tmp_path / "f.jsonl"), "--retain", str(tmp_path / "r.jsonl")]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(args + ["--out", str(tmp_path / "busy")]) == 2  # refused before any model loads
    assert "not empty" in capsys.readouterr().err
    code = main(args + ["--out", str(tmp_path / "hard"), "--json", str(tmp_path / "h.json")])
    report = json.loads((tmp_path / "h.json").read_text())
    assert code == (0 if report["converged"] else 2)
    assert report["method"] == "harden" and report["certificate"]["formats"]["nf4"]["collateral"] == 0
    assert mansu.check(tmp_path / "before", tmp_path / "hard", ["nf4"]).certified
    assert report["config"]["edit"]["edits_per_round"] == mansu.HardenConfig().edit.edits_per_round  # its defaults


def test_callback_refuses_a_peft_model(tokenizer, capitals):
    from mansu.integrations import MansuCallback

    class Adapted(torch.nn.Module):
        def merge_and_unload(self):
            return self

    with pytest.raises(mansu.MansuError, match="merge_and_unload"):
        MansuCallback(tokenizer, capitals[:4], capitals[4:8]).on_train_begin(None, None, None, model=Adapted())
