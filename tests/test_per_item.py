import pytest
import torch
from torch import nn

from mansu.errors import MansuError
from mansu.per_item import per_item_grads, sites


@pytest.mark.parametrize("how", ["flattened", "twice"])
def test_a_layer_per_item_gradients_cannot_read_is_refused(how):
    """Per-item gradients need each layer's input split by item, and each layer once per forward (each call's
    part is squared as backward reaches it); otherwise an error names the layer, and no hook stays behind."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(10, 4), nn.Linear(4, 4)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            return self.proj(x.reshape(-1, 4)) if how == "flattened" else self.proj(self.proj(x))

    model = Odd()
    found = sites(model, {"proj.weight": torch.arange(16)})  # every entry, as flat indices
    match = r"\[items, tokens, features\]" if how == "flattened" else "runs twice in one forward"
    with pytest.raises(MansuError, match=match):
        with per_item_grads(model, found, lambda name, grads: None):
            model(torch.zeros(2, 5, dtype=torch.long)).sum().backward()
    assert not model.proj._forward_hooks and not model.embed._forward_hooks
