"""What `unlearn` names for a suite split with `relation_neighbours=n`: the shared call of this folder's tables."""
from __future__ import annotations

import mansu
from mansu.data import Item, with_protection
from mansu.relation import self_neighbours


def named_for(model, tokenizer, split, n: int, seed: int = 0) -> list[Item]:
    """The items `unlearn` names on the unedited model for `split` (durability.Split), as its retain set with the
    default protection set asks the relation."""
    forget, retain = split.items()
    return self_neighbours(model, tokenizer, forget, with_protection(retain, forget, mansu.MansuConfig().protect),
                           n, seed)
