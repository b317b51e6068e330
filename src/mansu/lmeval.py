"""Export an item set as an lm-evaluation-harness task, so any checkpoint is scored by the harness as mansu scores it.

`mansu.evaluate` scores each choice by the summed log-probability of its continuation after the prompt, and an
item is correct when its answer wins: lm-eval's `multiple_choice` `acc` (not `acc_norm`). The task writes each
choice as mansu continues the prompt (`mansu.data.continuation`: one space, none after a prompt ending in one)
with an empty `target_delimiter`, so both tokenise the same text.

    mansu.export_lmeval(forget, "tasks", "forget_capitals")
    lm_eval --model hf --model_args pretrained=DIR --include_path tasks --tasks forget_capitals
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from .data import continuation, load_items
from .errors import MansuError
from .files import YAML_MARK, claim, write_text, written_by_mansu

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def task_yaml(task_name: str, data_path: Path) -> str:
    """The task's YAML; strings are written as JSON strings, which YAML reads as they are."""
    from . import __version__

    def q(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    return (f"{YAML_MARK} {__version__} (mansu.export_lmeval): cloze multiple choice, scored as mansu.evaluate\n"
            f"task: {q(task_name)}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {q(str(data_path))}\n"
            f"test_split: test\n"
            f"output_type: multiple_choice\n"
            f"doc_to_text: prompt\n"
            f"doc_to_choice: choices\n"
            f"doc_to_target: gold\n"
            f'target_delimiter: ""  # each choice already holds its separator, as mansu continues the prompt\n'
            f"metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def export_lmeval(items: str | os.PathLike | Iterable[Any], out_dir: str | os.PathLike, task_name: str) -> Path:
    """Write `out_dir/<task_name>.yaml` and `.jsonl`: a local lm-eval task scoring `items` (anything
    `load_items` takes; every item needs choices) as `mansu.evaluate` does. Returns the YAML's path.
    Files mansu did not write are never replaced; the YAML names the JSONL by its absolute path."""
    if not isinstance(task_name, str) or not _NAME.fullmatch(task_name):
        raise MansuError(f"task name must be letters, digits, '_', '.', '-' (a file name lm-eval accepts), "
                         f"got {task_name!r}")
    items = load_items(items)
    missing = [i for i, it in enumerate(items) if not it.choices]
    if missing:
        raise MansuError(f"{len(missing)} item(s) have no choices (e.g. item {missing[0]}); an lm-eval "
                         "multiple_choice task needs them")
    out = Path(out_dir).expanduser().resolve()
    yaml_path, data_path = claim(out / f"{task_name}.yaml"), out / f"{task_name}.jsonl"
    if data_path.exists() and not written_by_mansu(yaml_path):
        # the data file carries no mark of its own: it is mansu's only beside the task file mansu wrote
        raise MansuError(f"{data_path} already exists and was not written by mansu; choose another name or folder")
    records = [{"prompt": it.prompt, "choices": [continuation(it.prompt, c) for c in it.choices],
                "gold": it.choices.index(it.answer)} for it in items]
    write_text(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), replace=True)
    return write_text(yaml_path, task_yaml(task_name, data_path), replace=True)

