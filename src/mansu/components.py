"""Attention heads and MLP neurons of each decoder layer, found on the Hugging Face module tree.

A head's activation is its slice of the input to the attention output projection (o_proj, c_proj,
dense): what the head writes before the heads are mixed. A neuron's activation is its coordinate of
the input to the MLP down projection. Both are read and replaced by forward pre-hooks on those
"site" modules, so the model stays the plain Hugging Face model.

A family is a few module names (`LAYOUTS`); a model gets the first layout whose modules all exist in
its first decoder layer, so Llama-like families (Mistral, Qwen2/3, Gemma 1-3, OLMo) share one entry.

Parameter slices of a component (the `mask` convention of docs/design.md):
- head h: its rows of the query projection, the rows of the key/value head it reads (with grouped-
  query attention, KV head h // (heads / kv_heads), as `repeat_kv` does; that KV head is shared with
  the other query heads of its group, so `kv=False` leaves keys/values out), and its columns of the
  output projection;
- neuron n: its rows of gate/up (c_fc, dense_h_to_4h) and its column of the down projection.
Rows are output features: the bias entries of those rows belong to the component too. The output
projections' biases are shared by all heads/neurons and never belong to one. GPT-2's Conv1D stores
weights as [in, out], so its rows and columns swap; GPT-NeoX's fused query_key_value orders its rows
per head ([q k v] of head 0, then of head 1, ...), GPT-2's c_attn in blocks ([all q | all k | all v]).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .errors import MansuError

KINDS = ("head", "neuron")
Mask = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Module names inside one decoder layer; `qkv` says how a fused q/k/v projection orders its rows."""

    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    down: str
    qkv: str = "separate"  # or "blocks" ([all q | all k | all v]) or "per_head" ([q k v] per head)


LAYOUTS = {
    "llama": Layout("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    "gpt2": Layout("attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj",
                   qkv="blocks"),
    "gpt_neox": Layout(*["attention.query_key_value"] * 3, "attention.dense", ("mlp.dense_h_to_4h",),
                       "mlp.dense_4h_to_h", qkv="per_head"),
}
LAYER_LISTS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


@dataclass(frozen=True, order=True)
class Component:
    """One attention head or MLP neuron: its kind (in KINDS), layer, and index within the layer."""

    kind: str
    layer: int
    index: int

    def __str__(self) -> str:
        return f"L{self.layer}.{'H' if self.kind == 'head' else 'N'}{self.index}"

    @classmethod
    def parse(cls, name: str) -> "Component":
        """Inverse of `str`: 'L3.H2' is head 2 of layer 3, 'L3.N17' neuron 17."""
        match = re.fullmatch(r"L(\d+)\.([HN])(\d+)", name)
        if not match:
            raise MansuError(f"not a component name: {name!r} (expected e.g. 'L3.H2' or 'L3.N17')")
        return cls("head" if match[2] == "H" else "neuron", int(match[1]), int(match[3]))


@dataclass
class Components:
    """Where a model's heads and neurons live: decoder-layer prefixes, the layout, and the counts."""

    layers: list[str]
    layout: Layout
    heads: int
    kv_heads: int
    head_dim: int
    neurons: int
    transposed: frozenset[str]  # modules storing their weight as [in, out] (GPT-2's Conv1D)

    def count(self, kind: str) -> int:
        """Components of `kind` per layer."""
        return self.heads if kind == "head" else self.neurons

    def width(self, kind: str) -> int:
        """Activation features per component: head_dim for a head, 1 for a neuron."""
        return self.head_dim if kind == "head" else 1

    def sites(self, kind: str) -> list[str]:
        """Per layer, the module whose input holds the activations of `kind`."""
        return [f"{p}.{self.layout.o if kind == 'head' else self.layout.down}" for p in self.layers]

    def all(self) -> list[Component]:
        """Every head and neuron, heads first, in layer order."""
        return [Component(k, l, i) for k in KINDS for l in range(len(self.layers)) for i in range(self.count(k))]

    def slices(self, c: Component, kv: bool = True) -> list[tuple[str, str, torch.Tensor]]:
        """`(module, side, features)` owned by `c`; side 'out' = output features (rows), 'in' = inputs."""
        lay, prefix = self.layout, self.layers[c.layer]
        if c.kind == "neuron":
            idx = torch.tensor([c.index])
            return [(f"{prefix}.{m}", "out", idx) for m in lay.mlp_in] + [(f"{prefix}.{lay.down}", "in", idx)]
        d, r = self.head_dim, torch.arange(self.head_dim)
        kv_head = c.index // (self.heads // self.kv_heads)  # the KV head repeat_kv gives this query head
        if lay.qkv == "per_head":
            q, k, v = (c.index * 3 * d + j * d + r for j in range(3))  # no GQA in this layout
        elif lay.qkv == "blocks":
            q_size, kv_size = self.heads * d, self.kv_heads * d
            q, k, v = c.index * d + r, q_size + kv_head * d + r, q_size + kv_size + kv_head * d + r
        else:
            q, k, v = c.index * d + r, kv_head * d + r, kv_head * d + r
        out = [(f"{prefix}.{lay.q}", "out", q)]
        if kv:
            out += [(f"{prefix}.{lay.k}", "out", k), (f"{prefix}.{lay.v}", "out", v)]
        return out + [(f"{prefix}.{lay.o}", "in", c.index * d + r)]

    def mask(self, model: nn.Module, components: Iterable[Component], kv: bool = True) -> Mask:
        """Parameter mask (name -> bool tensor of the parameter's shape) of the components' slices."""
        mask: Mask = {}
        for c in components:
            for module_name, side, idx in self.slices(c, kv):
                module = model.get_submodule(module_name)
                out_dim = 1 if module_name in self.transposed else 0
                weight = mask.setdefault(f"{module_name}.weight", torch.zeros_like(module.weight, dtype=torch.bool))
                weight.index_fill_(out_dim if side == "out" else 1 - out_dim, idx.to(weight.device), True)
                if side == "out" and getattr(module, "bias", None) is not None:
                    bias = mask.setdefault(f"{module_name}.bias", torch.zeros_like(module.bias, dtype=torch.bool))
                    bias[idx.to(bias.device)] = True
        return mask


def _layer_list(model: nn.Module) -> str:
    for path in LAYER_LISTS:
        try:
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise MansuError(
        f"cannot map {type(model).__name__}: no decoder-layer list at any of {list(LAYER_LISTS)}"
    )


def find_components(model: nn.Module) -> Components:
    """Map a Hugging Face causal LM's heads and neurons; `MansuError` names what an unknown one lacks."""
    from transformers.pytorch_utils import Conv1D

    path = _layer_list(model)
    first = model.get_submodule(f"{path}.0")
    names = {n for n, _ in first.named_modules()}
    missing = {name: [m for m in (lay.q, lay.k, lay.v, lay.o, *lay.mlp_in, lay.down) if m not in names]
               for name, lay in LAYOUTS.items()}
    family = min(missing, key=lambda n: len(missing[n]))
    if missing[family]:
        raise MansuError(
            f"cannot map the heads and neurons of {type(model).__name__}: its decoder layer "
            f"({type(first).__name__}) lacks {missing[family]} of the closest known layout '{family}' "
            f"(known: {sorted(LAYOUTS)})"
        )
    layout = LAYOUTS[family]
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = [f"{path}.{i}" for i in range(len(model.get_submodule(path)))]
    transposed = frozenset(n for n, m in model.named_modules() if isinstance(m, Conv1D))
    o, down = model.get_submodule(f"{layers[0]}.{layout.o}"), model.get_submodule(f"{layers[0]}.{layout.down}")
    in_dim = 0 if isinstance(o, Conv1D) else 1  # Conv1D weights are [in, out]
    if o.weight.shape[in_dim] != heads * head_dim or heads % kv_heads:
        raise MansuError(
            f"cannot map the heads of {type(model).__name__}: {layout.o} takes {o.weight.shape[in_dim]} inputs, "
            f"not heads x head_dim = {heads} x {head_dim} (kv heads {kv_heads})"
        )
    return Components(layers, layout, heads, kv_heads, head_dim, down.weight.shape[in_dim], transposed)
