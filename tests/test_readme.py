"""The README's Python examples run as written (on the real embedded model)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
PIECES_HEADING = "## The pieces, one by one"
_start = TEXT.index(PIECES_HEADING)
_end = TEXT.find("\n## ", _start + len(PIECES_HEADING))
PIECES_TEXT = TEXT[_start:_end if _end != -1 else len(TEXT)]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


PIECES = python_blocks(PIECES_TEXT)
BLOCKS = python_blocks(TEXT.replace(PIECES_TEXT, ""))  # the stand-alone examples


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2
    assert len(PIECES) >= 9  # data, evaluation, attribution, fisher/projection, floor, check, unlearn, cad, probes


@pytest.mark.slow
def test_the_first_example_meets_the_four_properties(capsys):
    """The demo as the README runs it, checked for the paper's properties: forgotten in full precision AND NF4,
    retain kept, certified, erased structurally (one unlearning run serves both the README and the claim)."""
    import mansu

    namespace: dict = {}
    exec(compile(BLOCKS[0], "README.md example 1", "exec"), namespace)
    assert "certified=True" in capsys.readouterr().out
    model, tokenizer, result = namespace["model"], namespace["tokenizer"], namespace["result"]
    for m in (model, namespace["deployed"]):
        assert mansu.evaluate(m, tokenizer, namespace["forget"], progress=False).accuracy <= 0.35
        assert mansu.evaluate(m, tokenizer, namespace["retain"], progress=False).accuracy >= 0.95
    assert result.converged and result.certificate.certified
    assert mansu.cad(model, tokenizer, result.circuit, namespace["forget"]).verdict == "structural"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(1, len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md example {index + 1}", "exec"), {})
    assert "flipped" in capsys.readouterr().out


@pytest.mark.slow
def test_the_pieces_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the lm-eval export writes beside the working directory
    namespace: dict = {}
    for index, block in enumerate(PIECES):
        exec(compile(block, f"README.md piece {index + 1}", "exec"), namespace)
        assert capsys.readouterr().out.strip(), f"piece {index + 1} printed nothing"
    import mansu

    assert namespace["certificate"]["nf4"].certified and namespace["stats"].kept > 0
    assert isinstance(namespace["result"], mansu.UnlearnResult) and namespace["seen"] == namespace["result"].rounds
    assert (tmp_path / "lmeval-tasks" / "forget_capitals.jsonl").is_file()
