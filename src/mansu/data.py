"""Forget and retain sets: validated (prompt, answer, choices) items, bundled fact sets, and batches.

An item is a cloze question: the model should continue `prompt` with `answer` (joined by one space,
as lm-evaluation-harness does); `choices`, when given, are the candidates for multiple-choice scoring.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import MansuError, MansuWarning

_BUNDLE = "mansu.datasets"


@dataclass(frozen=True)
class Item:
    """One cloze fact: `prompt` continued by `answer`; `choices` (containing `answer`) for MC scoring;
    `paraphrases`: other prompts asking the same fact (same answer and choices), to probe forgetting with."""

    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    paraphrases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("prompt", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise MansuError(f"item field {name!r} must be a non-empty string, got {value!r}")
            _check_unicode(value, name)
        if self.choices is not None:
            if isinstance(self.choices, str) or not all(isinstance(c, str) and c.strip() for c in self.choices):
                raise MansuError(f"item 'choices' must be a list of non-empty strings, got {self.choices!r}")
            for choice in self.choices:
                _check_unicode(choice, "choices")
            object.__setattr__(self, "choices", tuple(self.choices))
            if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices):
                raise MansuError(f"item 'choices' needs at least 2 distinct strings, got {list(self.choices)}")
            if self.answer not in self.choices:
                raise MansuError(f"answer {self.answer!r} is not among its choices {list(self.choices)}")
        if isinstance(self.paraphrases, str) or not all(isinstance(p, str) and p.strip() for p in self.paraphrases):
            raise MansuError(f"item 'paraphrases' must be a list of non-empty strings, got {self.paraphrases!r}")
        for paraphrase in self.paraphrases:
            _check_unicode(paraphrase, "paraphrases")
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))

    @property
    def continuation(self) -> str:
        return continuation(self.prompt, self.answer)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "answer": self.answer}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.paraphrases:
            out["paraphrases"] = list(self.paraphrases)
        return out

    def paraphrased(self) -> list["Item"]:
        """The item asked with each of its paraphrases instead of its prompt."""
        return [Item(p, self.answer, self.choices) for p in self.paraphrases]


def _check_unicode(text: str, name: str) -> None:
    """Refuse text a tokenizer cannot encode (JSON allows lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MansuError(f"item field {name!r} holds invalid Unicode (a lone surrogate): {text!r}") from None


def continuation(prompt: str, answer: str) -> str:
    """The text appended to `prompt`: the answer after one space (none if the prompt ends in one)."""
    return answer if prompt.endswith((" ", "\n")) else " " + answer


_FIELDS = ("prompt", "answer", "choices", "paraphrases")


def _item_from(record: Any, where: str) -> Item:
    if isinstance(record, Item):
        return record
    if not isinstance(record, dict):
        raise MansuError(f"{where}: expected an object with 'prompt' and 'answer', got {type(record).__name__}")
    missing = [k for k in ("prompt", "answer") if k not in record]
    if missing:
        raise MansuError(f"{where}: missing field(s) {missing}; an item needs 'prompt' and 'answer'")
    unknown = sorted(str(k) for k in record if k not in _FIELDS)
    if unknown:  # a misspelt 'choices' would otherwise silently turn multiple choice off
        raise MansuError(f"{where}: unknown field(s) {unknown}; an item has {list(_FIELDS)}")
    for name in ("choices", "paraphrases"):
        if record.get(name) is not None and not isinstance(record[name], (list, tuple)):
            raise MansuError(f"{where}: {name!r} must be a list of strings, got {type(record[name]).__name__}")
    try:
        return Item(record["prompt"], record["answer"], record.get("choices"), record.get("paraphrases") or ())
    except MansuError as err:
        raise MansuError(f"{where}: {err}") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of each line of a UTF-8 file (a BOM is skipped; \\n, \\r\\n and \\r all end a line); a
    line that is not UTF-8 is an error naming it, never a guessed decoding."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise MansuError(f"{path} is UTF-16 text; save it as UTF-8")
    data = data.removeprefix(b"\xef\xbb\xbf")
    # JSON escapes line breaks inside strings, so every raw \r or \n ends a line.
    for number, raw in enumerate(re.split(rb"\r\n|\r|\n", data), 1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MansuError(f"{path}:{number}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                             "save the file as UTF-8") from None


def read_jsonl(path: str | os.PathLike) -> list[Item]:
    """Items from a JSON-lines file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MansuError(f"no such data file: {path}")
    items = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:  # ValueError: also a number too long to convert
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err) or type(err).__name__
            raise MansuError(f"{path}:{number}: malformed JSON ({reason})") from None
        items.append(_item_from(record, f"{path}:{number}"))
    if not items:
        raise MansuError(f"{path} holds no items")
    return items


def check_disjoint(**sets: Sequence[Item] | None) -> None:
    """Refuse a prompt in two of the named sets (e.g. `forget=..., retain=..., utility=...`; None skips one):
    an item cannot be forgotten and kept, and utility must be what the edit never touches."""
    prompts = {name: {it.prompt.strip() for it in items} for name, items in sets.items() if items is not None}
    for (a, pa), (b, pb) in itertools.combinations(prompts.items(), 2):
        shared = pa & pb
        if shared:
            raise MansuError(f"{len(shared)} prompt(s) are in both the {a} and the {b} set, e.g. "
                             f"{sorted(shared)[0]!r}; remove it from one of them")


def relation_template(prompts: Sequence[str]) -> tuple[str, str] | None:
    """The words every prompt starts and ends with, around a subject each fills differently ("The capital of",
    "is"); None for one distinct prompt, or when they share fewer than two words."""
    words = [p.split() for p in dict.fromkeys(p.strip() for p in prompts)]
    if len(words) < 2:
        return None
    shortest = min(len(w) for w in words)  # leave every prompt at least one subject word
    head = min(len(os.path.commonprefix(words)), shortest - 1)
    tail = max(0, min(len(os.path.commonprefix([w[::-1] for w in words])), shortest - head - 1))
    if head + tail < 2:
        return None
    return " ".join(words[0][:head]), " ".join(words[0][len(words[0]) - tail:])


def subject_of(prompt: str, template: tuple[str, str]) -> str | None:
    """The words `prompt` puts between the relation template's head and tail; None when it does not ask it."""
    words, head, tail = prompt.split(), template[0].split(), template[1].split()
    asks = len(words) > len(head) + len(tail) and words[:len(head)] == head and words[len(words) - len(tail):] == tail
    return " ".join(words[len(head):len(words) - len(tail)]) if asks else None


def relation_text(template: tuple[str, str]) -> str:
    """The relation as a person reads it: "The capital of ... is"."""
    return " ".join([template[0], "...", template[1]]).strip()


def relation_mates(forget: Sequence[Item], retain: Sequence[Item]) -> list[Item]:
    """The retain items that ask the forget prompts' relation (`relation_template`) of another subject."""
    template = relation_template([it.prompt for it in forget])
    return [it for it in retain if subject_of(it.prompt, template)] if template else []


def warn_if_relation_unkept(forget: Sequence[Item], retain: Sequence[Item]) -> None:
    """Warn when the forget prompts share a relation ("The capital of ... is") that no retain prompt asks of
    another subject: nothing then tells the edit to keep the relation itself."""
    template = relation_template([it.prompt for it in forget])
    if template is None or any(subject_of(it.prompt, template) for it in retain):
        return
    warnings.warn(f"no retain prompt asks the forget prompts' relation ({relation_text(template)!r}) of another "
                  "subject, so nothing tells the edit to keep the relation itself: on the durability suite's "
                  "cross-domain splits the model kept only 0.12-0.49 of that relation's other facts in NF4 after "
                  "MANSU. Add facts of the relation the model should keep to the retain set, or let the model name "
                  "some (MansuConfig(relation_neighbours=20); docs/method.md, \"Neighbours the model names itself\")",
                  MansuWarning, stacklevel=3)


def load_items(source: str | os.PathLike | Iterable[Any]) -> list[Item]:
    """Items from a bundled set name, a JSONL path, a list of dicts/Items, or a `datasets.Dataset`."""
    if isinstance(source, (str, os.PathLike)):
        if str(source) in bundled_sets() and not Path(source).exists():
            return load_bundled(str(source))
        return read_jsonl(source)
    items = [_item_from(record, f"item {i}") for i, record in enumerate(source)]
    if not items:
        raise MansuError("the item set is empty")
    return items


def write_jsonl(path: str | os.PathLike, items: Sequence[Item], replace: bool = False) -> Path:
    """Write items as JSON lines, atomically (the format `read_jsonl` reads); an existing file only if
    `replace` (see `mansu.files.claim`)."""
    from .files import write_text

    return write_text(path, "".join(json.dumps(it.to_dict()) + "\n" for it in items), replace)


def bundled_sets() -> list[str]:
    """Names of the fact sets shipped with mansu (each verified on the embedded model)."""
    return sorted(p.name[: -len(".jsonl")] for p in resources.files(_BUNDLE).iterdir() if p.name.endswith(".jsonl"))


def load_bundled(name: str) -> list[Item]:
    """A bundled fact set by name, e.g. `load_bundled("capitals")`."""
    if name not in bundled_sets():
        raise MansuError(f"no bundled set {name!r}; choose one of {bundled_sets()}")
    with resources.as_file(resources.files(_BUNDLE) / f"{name}.jsonl") as path:
        return read_jsonl(path)


def load_anchor(source: str, exclude: Sequence[Item] = ()) -> list[Item]:
    """The items an anchor guard watches: bundled anchor sets by name, several joined by "+" ("general":
    general-knowledge facts; "countries": facts about countries in relations no bundled fact set asks, such as
    dishes, landmarks and rivers; both known to the embedded model and in no bundled fact set), or a JSONL path;
    less every item that shares a prompt or an answer with `exclude` (the forget set: the guard must not protect
    what the edit removes)."""
    folder = resources.files(_BUNDLE) / "anchors"
    names = source.split("+")
    if all((folder / f"{name}.jsonl").is_file() for name in names):
        items = []
        for name in names:
            with resources.as_file(folder / f"{name}.jsonl") as path:
                items += read_jsonl(path)
    elif Path(source).is_file():
        items = read_jsonl(source)
    else:
        bundled = sorted(f.name.removesuffix(".jsonl") for f in folder.iterdir() if f.name.endswith(".jsonl"))
        raise MansuError(f"no anchor set {source!r}: name bundled ones ({', '.join(map(repr, bundled))}; several joined "
                         "by '+') or a JSONL file")
    prompts = {it.prompt.strip() for it in exclude}
    answers = {it.answer.strip().lower() for it in exclude}
    kept = [it for it in items if it.prompt.strip() not in prompts and it.answer.strip().lower() not in answers]
    if not kept:
        raise MansuError(f"every item of the anchor set {source!r} shares a prompt or an answer with the forget set")
    return kept


def with_protection(retain: Sequence[Item], forget: Sequence[Item], source: str | None) -> list[Item]:
    """`retain` plus the anchor set `source` (see `load_anchor`; less what the forget set names or retain already
    has): what the edit keeps, beyond what the user named. None: `retain` alone."""
    if source is None:
        return list(retain)
    have = {it.prompt.strip() for it in retain}
    return [*retain, *(it for it in load_anchor(source, forget) if it.prompt.strip() not in have)]


def split(items: Sequence[Item], n_first: int, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """A seeded random split into `n_first` items and the rest (e.g. forget and retain)."""
    if not 0 < n_first < len(items):
        raise MansuError(f"cannot split {len(items)} items into {n_first} and the rest")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n_first]], [items[i] for i in order[n_first:]]


def train_on_paraphrases(items: Sequence[Item], n: int) -> list[Item]:
    """`items`, each keeping only its paraphrases past the first `n` (the held-out ones the paraphrase probe
    reads), then each item's first `n` paraphrases as forget items of their own: the edit is pushed off the
    fact, not off one wording of it, and is still probed on wordings it never saw."""
    if n < 0:
        raise MansuError(f"the number of paraphrases to train on must be >= 0, got {n}")
    kept = [Item(it.prompt, it.answer, it.choices, it.paraphrases[n:]) for it in items]
    return kept + [Item(p, it.answer, it.choices) for it in items for p in it.paraphrases[:n]]


# Rewordings of a forget item's prompt that need no paraphrase from the user: an edit trained on the exact prompt
# alone can be tied to it (cross-cities-5: 0.90 of held-out paraphrases still answered, docs/method.md).
VARIANTS = ("trim1", "trim2", "quoted", "fact")


def prompt_variants(items: Sequence[Item], kinds: Sequence[str], avoid: Sequence[Item] = ()) -> list[Item]:
    """Each item asked in each generated wording of `kinds` (same answer and choices), less any wording that
    repeats a prompt of `items` or `avoid` (e.g. the retain set). "trimN" drops the prompt's first N words where
    another item starts with the same N words (a shared template, so the words that name the fact stay: "The
    city of Munich is in" -> "of Munich is in", never "Kenya is a country in" -> "a country in"); "quoted" asks
    it as 'Q: Complete: "<prompt> ..."\nA:'; "fact" as "Fact: <prompt>"."""
    unknown = sorted(set(kinds) - set(VARIANTS))
    if unknown:
        raise MansuError(f"unknown prompt variant(s) {unknown}; choose from {list(VARIANTS)}")
    words = [it.prompt.split(" ") for it in items]
    seen = {it.prompt.strip() for it in [*items, *avoid]}
    out = []
    for i, it in enumerate(items):
        for kind in kinds:
            if kind == "quoted":
                prompt = f'Q: Complete: "{it.prompt.strip()} ..."\nA:'
            elif kind == "fact":
                prompt = f"Fact: {it.prompt}"
            else:
                n = int(kind.removeprefix("trim"))
                shared = any(j != i and w[:n] == words[i][:n] for j, w in enumerate(words))
                if not shared or len(words[i]) <= n + 1:  # a variant keeps at least two words
                    continue
                prompt = " ".join(words[i][n:])
            if prompt.strip() not in seen:
                seen.add(prompt.strip())
                out.append(Item(prompt, it.answer, it.choices))
    return out


@dataclass
class Batch:
    """Right-padded token ids; `target_mask[b, t]` marks positions whose next token is an answer token."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T-1] bool, aligned with logits[:, :-1]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Sequence[int]) -> "Batch":
        """The rows `index`, in that order, trimmed to the longest of them."""
        pick = torch.tensor(index, device=self.input_ids.device)
        width = int(self.attention_mask[pick].sum(1).max())
        return Batch(self.input_ids[pick, :width], self.attention_mask[pick, :width], self.target_mask[pick, : width - 1])


def length_groups(lengths: Sequence[int], forward_cost: int) -> list[list[int]]:
    """Row indices in groups of similar length (shortest first) that minimise the padded tokens run, counting
    `forward_cost` tokens for each group's forward of its own."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    longest = [lengths[i] for i in order]
    ends = [k + 1 for k in range(len(order)) if k + 1 == len(order) or longest[k + 1] != longest[k]]
    best = {0: (0, 0)}  # rows taken -> (least cost, where its last group starts)
    for end in ends:  # a group ends where the length changes: its rows are padded to its last row's length
        best[end] = min((cost + (end - start) * longest[end - 1] + forward_cost, start)
                        for start, (cost, _) in best.items())
    groups, end = [], len(order)
    while end:
        start = best[end][1]
        groups.append(order[start:end])
        end = start
    return groups[::-1]


def split_tokens(tokenizer, prompt: str, continued: str) -> tuple[list[int], int]:
    """Token ids of `prompt + continued` read as one text, and the index of the first continuation token.

    One text, not two: a tokenizer that prepends a space marker (SentencePiece-style, Llama-2, Mistral v0.1)
    would give a separately tokenised continuation a stray "▁" token. A token belongs to the continuation
    when its characters (offsets) reach past the prompt; special tokens appended after the text are dropped.
    """
    try:
        enc = tokenizer(prompt + continued, add_special_tokens=True, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
    except NotImplementedError as err:  # slow tokenizers have no offsets
        raise MansuError(f"mansu needs a fast tokenizer (with offsets), got {type(tokenizer).__name__}") from err
    ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    text = [i for i, s in enumerate(special) if not s]
    start = next((i for i in text if offsets[i][1] > len(prompt)), None)
    if start is None or start == 0:
        raise MansuError(f"prompt {prompt!r} or its continuation {continued!r} tokenises to nothing")
    return ids[: text[-1] + 1], start


def encode(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> Batch:
    """Tokenise each prompt with its continuation (`split_tokens`) and pad on the right."""
    rows = [split_tokens(tokenizer, prompt, continuation(prompt, answer))
            for prompt, answer in zip(prompts, answers, strict=True)]
    return pad_rows(rows, pad_id(tokenizer))


def pad_id(tokenizer) -> int:
    """The id padding is written with (masked out everywhere it is read)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_tokens(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists right-padded with `pad` into one [B, T] tensor, and its attention mask."""
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
    return input_ids, attention_mask


def pad_rows(rows: Sequence[tuple[list[int], int]], pad: int) -> Batch:
    """A `Batch` of `split_tokens` rows (token ids, index of the first answer token)."""
    input_ids, attention_mask = pad_tokens([row for row, _ in rows], pad)
    target_mask = torch.zeros((len(rows), input_ids.shape[1] - 1), dtype=torch.bool)
    for b, (row, start) in enumerate(rows):
        target_mask[b, start - 1 : len(row) - 1] = True  # logits at t predict token t+1
    return Batch(input_ids, attention_mask, target_mask)


def encode_items(tokenizer, items: Sequence[Item]) -> Batch:
    """One batch of the items' (prompt, answer) pairs."""
    return encode(tokenizer, [it.prompt for it in items], [it.answer for it in items])


def batches(tokenizer, items: Sequence[Item], batch_size: int = 16) -> Iterator[Batch]:
    """Batches of (prompt, answer) for losses, Fisher and attribution: only answer tokens count."""
    if batch_size < 1:
        raise MansuError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(items), batch_size):
        yield encode_items(tokenizer, items[i : i + batch_size])
