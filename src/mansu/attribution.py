"""EAP-IG node attribution of the answer log-likelihood, and the forget circuit it selects.

score_c = sum over positions of (a_c - a'_c) . mean_{k=1..m} dM/dz_c at alpha = k/m, where M is the
summed answer log-likelihood (`answer_logprob`), a_c the clean activation, a'_c the baseline (zero, or
the component's mean activation over the retain tokens) and z_c = a'_c + alpha (x_c - a'_c) is what
every component passes on at interpolation step alpha, x_c being what it computes on that pass. So
alpha = 0 runs the model with every component at its baseline, alpha = 1 is the clean model, and the
gradient at each step is a total effect (everything downstream is recomputed), which is what
ablating one component measures. The step alpha = 1 also records a_c: the cost is `steps` forward and
backward passes per batch (plus one forward pass over the retain set for the mean baseline), and
steps=1 is plain attribution patching.

Positions: the score sums over all positions, not only the answer-predicting ones, because the
ablation it estimates removes a component everywhere, and facts are largely recalled at the subject's
tokens inside the prompt. Positions that cannot influence the answer (padding, tokens after it) get
a zero gradient and add nothing. Scores are averaged over items.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .components import KINDS, Component, Components, Mask, find_components
from .data import Item, batches
from .config import check_types
from .errors import MansuError
from .evaluation import answer_logprob
from .hooks import forward_hooks
from .models import input_device
from .results import Result

Scores = dict[str, torch.Tensor]  # kind -> [layers, components per layer]
Baseline = dict[str, torch.Tensor]  # site module name -> [features]; missing sites are zero


@contextmanager
def interpolated(model: nn.Module, sites: Sequence[str], baseline: Baseline, alpha: float) -> Iterator[dict]:
    """Within the block each site's input x becomes a' + alpha (x - a'); yields site -> that tensor."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x, base = args[0], baseline.get(name)
            z = alpha * x if base is None else torch.lerp(base.to(x), x, alpha)
            if not z.requires_grad:  # the first site sits below any parameter that needs a gradient
                z.requires_grad_()
            seen[name] = z
            return (z, *args[1:])

        return hook

    with forward_hooks(((model.get_submodule(n), hook_for(n)) for n in sites), pre=True):
        yield seen


@contextmanager
def ablated(model: nn.Module, components: Sequence[Component], baseline: Baseline | None = None) -> Iterator[None]:
    """Within the block the components' activations are replaced by their baseline at every position."""
    comps = find_components(model)
    by_site: dict[str, list[Component]] = {}
    for c in components:
        by_site.setdefault(comps.sites(c.kind)[c.layer], []).append(c)
    baseline = baseline or {}

    def hook_for(name: str, cs: list[Component]):
        features = torch.cat([torch.arange(c.index * comps.width(c.kind), (c.index + 1) * comps.width(c.kind))
                              for c in cs])

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            base, index = baseline.get(name), features.to(x.device)  # this layer's device, not the model's first
            x[..., index] = 0.0 if base is None else base.to(x)[index]
            return (x, *args[1:])

        return hook

    with forward_hooks(((model.get_submodule(n), hook_for(n, cs)) for n, cs in by_site.items()), pre=True):
        yield


@torch.no_grad()
def mean_activations(model: nn.Module, tokenizer, items: Sequence[Item], batch_size: int = 16) -> Baseline:
    """Every site's mean input over the non-pad tokens of `items` (fp32, on the site's device): the 'mean' baseline."""
    comps = find_components(model)
    sites = [s for kind in KINDS for s in comps.sites(kind)]
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            keep = current["mask"].to(args[0].device)[..., None]  # a product, not a gather: no host sync
            sums[name] = sums.get(name, 0) + (args[0].double() * keep).sum((0, 1))

        return hook

    tokens = 0
    with forward_hooks(((model.get_submodule(n), hook_for(n)) for n in sites), pre=True):
        for batch in batches(tokenizer, items, batch_size):
            tokens += int(batch.attention_mask.sum())  # counted on the host batch: no device sync
            batch = batch.to(input_device(model))
            current["mask"] = batch.attention_mask
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return {n: (s / tokens).float() for n, s in sums.items()}


def attribute(
    model: nn.Module,
    tokenizer,
    items: Sequence[Item],
    steps: int = 5,
    baseline: Baseline | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Scores:
    """EAP-IG score of every head and neuron for the answer log-likelihood of `items` (mean per item).

    Accumulated in fp32 on each layer's device whatever the model's dtype; returned on the CPU."""
    if steps < 1:
        raise MansuError(f"steps must be >= 1, got {steps}")
    if not items:
        raise MansuError("cannot attribute an empty item set")
    comps = find_components(model)
    baseline = baseline or {}
    sites = {kind: comps.sites(kind) for kind in KINDS}
    names = [s for kind in KINDS for s in sites[kind]]
    totals: dict[str, list] = {kind: [0.0] * len(comps.layers) for kind in KINDS}  # per layer, on its device
    was_training = model.training
    model.eval()
    try:
        work = [(b, k) for b in batches(tokenizer, items, batch_size) for k in range(1, steps + 1)]
        grads: dict[str, torch.Tensor] = {}
        for batch, k in tqdm(work, desc="attribute", leave=False, disable=not progress):
            with interpolated(model, names, baseline, k / steps) as seen:
                metric = answer_logprob(model, batch, by_length=False).sum()  # `seen`: one forward's activations
                step_grads = torch.autograd.grad(metric, [seen[n] for n in names])
            for n, g in zip(names, step_grads):
                grads[n] = grads.get(n, 0) + g.float()
            if k < steps:
                continue
            for kind in KINDS:  # the last step (alpha = 1) is the clean run: close the batch
                for layer, n in enumerate(sites[kind]):
                    clean = seen[n].detach().float()
                    diff = clean - baseline[n].to(clean) if n in baseline else clean
                    per_feature = (diff * grads[n] / steps).sum(dim=(0, 1))
                    totals[kind][layer] = totals[kind][layer] + per_feature.view(comps.count(kind), -1).sum(-1)
            grads = {}
    finally:
        model.train(was_training)
    return {kind: torch.stack([t.cpu() for t in layers]) / len(items) for kind, layers in totals.items()}


def scores_of(scores: Scores, components: Sequence[Component]) -> torch.Tensor:
    """The scores of `components`, in their order, as one vector."""
    return torch.stack([scores[c.kind][c.layer, c.index] for c in components]) if components else torch.zeros(0)


@dataclass
class CircuitConfig:
    """How components are scored (EAP-IG) and which of them form the forget circuit."""

    steps: int = 5  # interpolation steps; 1 is plain attribution patching
    baseline: str = "zero"  # "zero", or "mean": each component's mean activation on the retain set
    top_k: int | None = None  # per kind, keep the k components of highest |forget score| ...
    mass: float | None = 0.1  # ... or the fewest that carry this fraction of the kind's total |score|
    kinds: tuple[str, ...] = KINDS  # which kinds of component may enter the circuit
    retain_penalty: float = 0.0  # rank by |forget| - penalty * |retain| (needs a retain set)
    kv: bool = True  # a head owns the rows of the KV head it reads (shared with its GQA group)
    batch_size: int = 16
    progress: bool = True
    random: bool = False  # ablation: as many components per kind as selected, but drawn at random (seed 0)

    def __post_init__(self) -> None:
        check_types(self)
        if self.steps < 1:
            raise MansuError(f"steps must be >= 1, got {self.steps}")
        if self.baseline not in ("zero", "mean"):
            raise MansuError(f"baseline must be 'zero' or 'mean', got {self.baseline!r}")
        if (self.top_k is None) == (self.mass is None):
            raise MansuError("give exactly one of top_k and mass (set the other to None)")
        if self.top_k is not None and self.top_k < 1:
            raise MansuError(f"top_k must be >= 1, got {self.top_k}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise MansuError(f"mass must be in (0, 1], got {self.mass}")
        self.kinds = tuple(self.kinds)
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise MansuError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if self.retain_penalty < 0:
            raise MansuError(f"retain_penalty must be >= 0, got {self.retain_penalty}")
        if self.batch_size < 1:
            raise MansuError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(repr=False)
class Circuit(Result):
    """The forget circuit: its components, their attribution, and the parameters they own."""

    components: list[Component]
    forget_scores: list[float]  # EAP-IG score of each component on the forget set, original model
    retain_scores: list[float] | None  # the same on the retain set, when one was given
    n_params: int  # parameters the circuit's mask marks
    total_params: int  # parameters of the model
    config: CircuitConfig

    @property
    def heads(self) -> int:
        return sum(c.kind == "head" for c in self.components)

    @property
    def neurons(self) -> int:
        return sum(c.kind == "neuron" for c in self.components)

    def summary(self) -> dict[str, Any]:
        return {"heads": self.heads, "neurons": self.neurons, "params": self.n_params,
                "param_fraction": self.n_params / self.total_params, "steps": self.config.steps,
                "baseline": self.config.baseline}

    def mask(self, model: nn.Module) -> Mask:
        """The parameter mask of the circuit on `model` (docs/design.md convention)."""
        return find_components(model).mask(model, self.components, kv=self.config.kv)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["components"] = [str(c) for c in self.components]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Circuit":
        """Inverse of `to_dict()`."""
        config = dict(d["config"], kinds=tuple(d["config"]["kinds"]))
        return cls([Component.parse(c) for c in d["components"]], d["forget_scores"], d["retain_scores"],
                   d["n_params"], d["total_params"], CircuitConfig(**config))


def select(forget: Scores, config: CircuitConfig, retain: Scores | None = None) -> list[Component]:
    """Per kind, components ranked by |forget| - penalty |retain|, cut by top_k or by mass."""
    chosen = []
    for kind in config.kinds:  # per kind: a head aggregates head_dim features and would crowd out neurons
        rank = forget[kind].abs().flatten()
        if retain is not None:
            rank = rank - config.retain_penalty * retain[kind].abs().flatten()
        order = torch.argsort(rank, descending=True, stable=True)
        positive = int((rank > 0).sum())
        if config.top_k is not None:
            n = min(config.top_k, positive)
        else:
            mass = rank[order[:positive]].cumsum(0)
            n = int((mass < config.mass * mass[-1]).sum()) + 1 if positive else 0
        width = forget[kind].shape[1]
        chosen += [Component(kind, i // width, i % width) for i in order[:n].tolist()]
    return sorted(chosen)


def random_like(components: list[Component], scores: Scores, seed: int = 0) -> list[Component]:
    """As many components of each kind as `components` holds, drawn uniformly at random (the ablation's
    circuit: the same size, no attribution)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for kind, shape in ((k, s.shape) for k, s in scores.items()):
        n = sum(c.kind == kind for c in components)
        picks = torch.randperm(shape[0] * shape[1], generator=gen)[:n].tolist()
        chosen += [Component(kind, i // shape[1], i % shape[1]) for i in picks]
    return sorted(chosen)


def attribute_circuit(
    model: nn.Module, tokenizer, forget: Sequence[Item], retain: Sequence[Item] | None = None,
    config: CircuitConfig | None = None,
) -> Circuit:
    """Score every component on the forget set (and retain set) with EAP-IG and select the circuit."""
    config = config or CircuitConfig()
    if retain is None and (config.baseline == "mean" or config.retain_penalty > 0):
        raise MansuError("baseline='mean' and retain_penalty > 0 need a retain set")
    baseline = mean_activations(model, tokenizer, retain, config.batch_size) if config.baseline == "mean" else None
    kwargs = dict(steps=config.steps, baseline=baseline, batch_size=config.batch_size, progress=config.progress)
    forget_scores = attribute(model, tokenizer, forget, **kwargs)
    retain_scores = attribute(model, tokenizer, retain, **kwargs) if retain is not None else None
    components = select(forget_scores, config, retain_scores)
    if config.random:
        components = random_like(components, forget_scores)
    comps: Components = find_components(model)
    mask = comps.mask(model, components, kv=config.kv)
    return Circuit(
        components=components,
        forget_scores=scores_of(forget_scores, components).tolist(),
        retain_scores=scores_of(retain_scores, components).tolist() if retain_scores else None,
        n_params=sum(int(m.sum()) for m in mask.values()),  # per tensor: the masks may sit on several devices
        total_params=sum(p.numel() for p in model.parameters()),
        config=config,
    )
