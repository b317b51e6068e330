"""Circuit-restricted null-space projection: updates that leave the retain inputs' layer outputs unchanged.

For a linear layer y = W x (W: [out, in]) whose update `delta` may touch the input columns S (all of
them for a head's q/k/v rows or a neuron's gate/up row; a head's block of o_proj columns or a neuron's
down_proj column otherwise), the retain inputs restricted to S give the uncentred covariance
C_S = sum_x x_S x_S^T over every non-pad token of the retain items (prompt and answer: a retain answer
reads every earlier position through attention). U holds C_S's top eigenvectors carrying a fraction
`energy` of its trace (relative, so it carries across activation scales, unlike an absolute
eigenvalue cutoff); delta[:, S] -> delta[:, S] (I - U U^T) then gives delta x ~= 0 for retain inputs
while keeping the update's rows and columns. The eigendecomposition is |S| x |S|: it follows the
circuit, not the layer. GPT-2's Conv1D ([in, out], y = x W) is handled as its transpose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Item, batches
from .config import check_types
from .errors import MansuError
from .hooks import capture_inputs
from .models import input_device
from .results import Result

Mask = dict[str, torch.Tensor]
Update = dict[str, torch.Tensor]


@dataclass
class ProjectionConfig:
    """How much of the retain inputs' energy the projected update must not touch."""

    energy: float = 0.99  # fraction of the retain covariance's trace whose directions are removed
    batch_size: int = 16  # retain items per forward pass while collecting covariances

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.energy <= 1:
            raise MansuError(f"energy must be in (0, 1], got {self.energy}")
        if self.batch_size < 1:
            raise MansuError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class LayerProjector:
    """Projects updates of one weight off the retain subspace of its input columns `columns`."""

    columns: torch.Tensor  # [S] long: the input features the update may touch
    basis: torch.Tensor  # [S, k] orthonormal: the retain directions holding `energy` of the energy on S
    conv1d: bool  # GPT-2 Conv1D stores the weight as [in, out]

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """delta[:, S] (I - U U^T), with the weight's own layout; columns outside S are returned as given
        (this projector knows nothing of their retain inputs)."""
        d = delta.T if self.conv1d else delta  # [out, in]
        cols = self.columns.to(d.device)
        out = d.clone()
        out[:, cols] = self.project(d[:, cols])
        return out.T if self.conv1d else out

    def project(self, block: torch.Tensor) -> torch.Tensor:
        """block (I - U U^T) for a block of rows over exactly the columns S, in S's order."""
        u = self.basis.to(block.device, block.dtype)
        return block - (block @ u) @ u.T


@dataclass(repr=False)
class Projector(Result):
    """Per-weight null-space projectors of a circuit; `skipped` masked params (biases, norms) pass unprojected."""

    layers: dict[str, LayerProjector]
    skipped: list[str]  # masked params that are not Linear/Conv1D weights: a bias moves outputs whatever x is
    energy: float
    tokens: int  # retain tokens the covariances were built from

    def summary(self) -> dict:
        return {"layers": len(self.layers), "skipped": len(self.skipped), "energy": self.energy,
                "tokens": self.tokens, "columns": sum(p.columns.numel() for p in self.layers.values()),
                "removed": sum(p.basis.shape[1] for p in self.layers.values())}

    def to_dict(self) -> dict:
        return {**self.summary(), "skipped_names": self.skipped}

    def apply(self, update: Update) -> Update:
        """The projected update: a weight's circuit columns S are projected (every row of them); what the
        projector has no projector for (columns outside S, parameters outside its mask, skipped ones) is
        returned as given, so a whole model's update can pass through."""
        return {name: self.layers[name].apply(delta) if name in self.layers else delta
                for name, delta in update.items()}


def linear_like(model: nn.Module, name: str) -> tuple[str, nn.Module | None, bool]:
    """(module name, module, is Conv1D) if `name` is the weight of a Linear or Conv1D, else module None."""
    from transformers.pytorch_utils import Conv1D

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else None
    if attr != "weight" or not isinstance(module, (nn.Linear, Conv1D)):
        return module_name, None, False
    return module_name, module, isinstance(module, Conv1D)


def retain_basis(cov: torch.Tensor, energy: float) -> torch.Tensor:
    """Top eigenvectors of a PSD matrix holding `energy` of its trace (numerically-zero eigenvalues count 0)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    evals[evals <= evals[0] * cov.shape[0] * torch.finfo(torch.float64).eps] = 0
    if evals[0] <= 0:
        return evecs[:, :0].float()
    fraction = evals.cumsum(0) / evals.sum()
    k = min(int((fraction < energy - 1e-12).sum()) + 1, cov.shape[0])
    return evecs[:, :k].float()


@torch.no_grad()
def null_space_projector(model: nn.Module, tokenizer, retain: Sequence[Item], mask: Mask,
                         config: ProjectionConfig | None = None, progress: bool = True) -> Projector:
    """Build the projectors of every Linear/Conv1D weight `mask` selects, from the retain items' inputs."""
    config = config or ProjectionConfig()
    if not retain:
        raise MansuError("cannot build a null-space projector from an empty retain set")
    targets: dict[str, tuple[str, torch.Tensor, bool]] = {}  # weight name -> (module name, columns, conv1d)
    modules, skipped = {}, []
    for name, m in mask.items():
        if not m.any():
            continue
        module_name, module, conv1d = linear_like(model, name)
        if module is None:
            skipped.append(name)
            continue
        m = (m.T if conv1d else m).bool()  # [out, in], where the mask is (the weight's device, from a circuit)
        rows, cols = m.any(1), m.any(0)
        if not torch.equal(m, rows[:, None] & cols[None, :]):
            raise MansuError(f"mask of {name!r} is not a block of rows x columns (as heads and neurons give)")
        targets[name] = (module_name, cols.nonzero().squeeze(1), conv1d)
        modules[module_name] = module
    if not targets:
        raise MansuError("the mask selects no Linear or Conv1D weight to project")

    covs: dict[str, torch.Tensor] = {}
    share: dict[str, str] = {}  # weight -> the weight whose covariance it shares (same input tensor, same S)
    tokens, device = 0, input_device(model)
    was_training = model.training
    model.eval()
    try:
        with capture_inputs(modules) as seen:
            for batch in tqdm(list(batches(tokenizer, retain, config.batch_size)), desc="projector",
                              leave=False, disable=not progress):
                tokens += int(batch.attention_mask.sum())  # counted on the host batch: no device sync
                batch = batch.to(device)
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                keep = batch.attention_mask.bool()
                if not share:  # q/k/v (and gate/up) read one tensor: one covariance serves them all
                    first: dict[tuple, str] = {}
                    for name, (module_name, cols, _) in targets.items():
                        x = seen[module_name][0]
                        share[name] = first.setdefault((x.data_ptr(), x.shape, tuple(cols.tolist())), name)
                for name, (module_name, cols, _) in targets.items():
                    if share[name] != name:
                        continue
                    for x in seen[module_name]:  # a module called twice per forward contributes twice
                        xs = x[keep.to(x.device)][:, cols.to(x.device)].double()
                        covs[name] = covs.get(name, 0) + xs.T @ xs  # on the layer's device, in fp64
                for inputs in seen.values():
                    inputs.clear()  # only one batch of activations is ever held
    finally:
        model.train(was_training)

    bases = {name: retain_basis(cov, config.energy)
             for name, cov in tqdm(covs.items(), desc="eigh", leave=False, disable=not progress)}
    layers = {name: LayerProjector(cols, bases[share[name]], conv1d) for name, (_, cols, conv1d) in targets.items()}
    return Projector(layers=layers, skipped=skipped, energy=config.energy, tokens=tokens)
