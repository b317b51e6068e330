"""The public surface: every exported name resolves, and no exported function hides a submodule."""
import importlib.util
import inspect
import pkgutil

import mansu


def test_every_exported_name_exists():
    assert sorted(n for n in mansu.__all__ if not hasattr(mansu, n)) == []
    assert len(set(mansu.__all__)) == len(mansu.__all__)


def test_no_exported_function_shadows_a_submodule():
    modules = {m.name for m in pkgutil.iter_modules(mansu.__path__)}
    functions = {n for n in mansu.__all__ if inspect.isfunction(getattr(mansu, n))}
    assert {"evaluate", "cad", "unlearn", "check"} <= functions
    assert sorted(functions & modules) == []
    # The documented paths resolve to the module, not to a function of the same name.
    assert importlib.util.find_spec("mansu.evaluation") is not None
    assert mansu.evaluation.answer_logprob is mansu.answer_logprob
    assert mansu.circuit_divergence.cad is mansu.cad


def test_docs_api_md_is_current():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    try:
        import api_doc
    finally:
        sys.path.pop(0)
    assert (root / "docs" / "api.md").read_text(encoding="utf-8") == api_doc.render(), \
        "docs/api.md is stale: run python tools/api_doc.py"
    assert [n for _, names in api_doc.groups() for n in names] == mansu.__all__
