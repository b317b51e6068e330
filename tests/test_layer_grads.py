import pytest
import torch
from torch import nn

from mansu.data import encode_items
from mansu.errors import MansuError
from mansu.evaluation import answer_logprob
from mansu.fisher import flat_index
from mansu.layer_grads import layer_grads, sites

from test_fisher import layer_mask


class Odd(nn.Module):
    """One Linear layer fed its input flattened across items, or run twice in one forward."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed, self.proj = nn.Embedding(10, 4), nn.Linear(4, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.proj(x.reshape(-1, 4)) if self.how == "flattened" else self.proj(self.proj(x))


def test_summed_gradients_are_autograds_at_the_selected_entries(tiny_model, capitals):
    """The rounds' gradient: a head's rows, a neuron's column and bias entries, read from layer hooks, equal what
    autograd gives the weights, with no parameter requiring a gradient (as the edit's rounds run it)."""
    model, tok = tiny_model
    mask = layer_mask(model)
    batch = encode_items(tok, capitals[:4])
    answer_logprob(model, batch).sum().backward()
    params = dict(model.named_parameters())
    expected = {n: params[n].grad[m] for n, m in mask.items()}
    model.zero_grad(set_to_none=True)
    got = {}
    for p in model.parameters():
        p.requires_grad_(False)
    with layer_grads(model, sites(model, {n: flat_index(m) for n, m in mask.items()}), got.__setitem__,
                     per_item=False):
        answer_logprob(model, batch).sum().backward()
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), name


@pytest.mark.parametrize("how", ["flattened", "twice"])
def test_summed_gradients_read_any_layer(how):
    """Summed over the batch, a flattened input or a second call is no obstacle: each call's part is handed over."""
    model, ids = Odd(how), torch.arange(10).reshape(2, 5)
    model(ids).sum().backward()
    expected = model.proj.weight.grad.reshape(-1).clone()
    model.proj.weight.grad = None
    total = []
    with layer_grads(model, sites(model, {"proj.weight": torch.arange(16)}), lambda n, g: total.append(g),
                     per_item=False):
        model(ids).sum().backward()
    assert len(total) == (2 if how == "twice" else 1)
    assert torch.allclose(sum(total), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["flattened", "twice"])
def test_a_layer_per_item_gradients_cannot_read_is_refused(how):
    """Per-item gradients need each layer's input split by item, and each layer once per forward (each call's
    part is squared as backward reaches it); otherwise an error names the layer, and no hook stays behind."""
    model = Odd(how)
    found = sites(model, {"proj.weight": torch.arange(16)})  # every entry, as flat indices
    match = r"\[items, tokens, features\]" if how == "flattened" else "runs twice in one forward"
    with pytest.raises(MansuError, match=match):
        with layer_grads(model, found, lambda name, grads: None):
            model(torch.zeros(2, 5, dtype=torch.long)).sum().backward()
    assert not model.proj._forward_hooks and not model.embed._forward_hooks
