"""The one exception type for user mistakes, and the one warning type for doubtful input: the CLI prints their
messages, never a traceback or a source location."""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator


class MansuError(ValueError):
    """Bad input (data, model name, option, unsupported architecture) explained in one sentence."""


class MansuWarning(UserWarning):
    """Input the edit can run on but a user should hear about (e.g. a relation no retain item keeps)."""


@contextlib.contextmanager
def mansu_warnings(show: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """Collect the messages of the `MansuWarning`s raised inside that the warning filters let through, and show
    them as they happen: with `show`, or as Python shows warnings. Other warnings pass untouched."""
    caught: list[str] = []
    # catch_warnings restores the display on the way out, and entering it resets Python's "once per place"
    # memory, so a second run in the same process reports its warnings again
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def display(message, category, *where, **kw) -> None:
            if not issubclass(category, MansuWarning):
                return shown(message, category, *where, **kw)
            caught.append(str(message))
            return show(str(message)) if show is not None else shown(message, category, *where, **kw)

        warnings.showwarning = display
        yield caught
