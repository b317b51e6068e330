import json

import pytest
import torch

import mansu
from mansu.data import (Item, batches, encode, load_bundled, load_items, prompt_variants, read_jsonl, relation_template,
                        split, train_on_paraphrases)


def test_item_validation():
    Item("The capital of France is", "Paris", ["Paris", "Rome"])
    with pytest.raises(mansu.MansuError, match="not among its choices"):
        Item("p", "Paris", ["Rome", "Oslo"])
    with pytest.raises(mansu.MansuError, match="non-empty"):
        Item("", "Paris")
    with pytest.raises(mansu.MansuError, match="distinct"):
        Item("p", "a", ["a", "a"])


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"\n')
    with pytest.raises(mansu.MansuError, match=r"f.jsonl:3: malformed JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(mansu.MansuError, match=r"f.jsonl:1: missing field\(s\) \['answer'\]"):
        read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(mansu.MansuError, match="holds no items"):
        read_jsonl(path)
    with pytest.raises(mansu.MansuError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_load_items_sources(tmp_path):
    records = [{"prompt": "a", "answer": "b", "choices": ["b", "c"]}, {"prompt": "x", "answer": "y"}]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    from_file, from_list = load_items(path), load_items(records)
    assert from_file == from_list and from_file[0].choices == ("b", "c")
    import datasets

    assert load_items(datasets.Dataset.from_list(records[:1])) == from_list[:1]
    with pytest.raises(mansu.MansuError, match="empty"):
        load_items([])


def test_bundled_sets_are_valid_and_large_enough():
    names = mansu.bundled_sets()
    assert len(names) >= 6 and {"capitals", "elements", "languages"} <= set(names)
    for name in names:
        items = mansu.load_bundled(name)
        # every wording of every fact is unique in its set, so no prompt can be both forgotten and retained
        prompts = [p for it in items for p in (it.prompt, *it.paraphrases)]
        assert len(items) >= 20 and len(set(prompts)) == len(prompts), name
        for it in items:
            assert len(it.choices) == 4 and len(it.paraphrases) >= 2, (name, it)
    assert load_items("capitals") == mansu.load_bundled("capitals")
    with pytest.raises(mansu.MansuError, match="no bundled set"):
        mansu.load_bundled("nope")


@pytest.mark.slow
def test_embedded_model_knows_every_bundled_fact_in_full_precision_and_nf4(embedded):
    model, tok = embedded
    nf4 = mansu.quantized_copy(model, "nf4")
    sets = {name: mansu.load_bundled(name) for name in mansu.bundled_sets()}
    anchor = mansu.data.load_anchor("general+countries")  # the anchor sets' facts: no paraphrases
    for m in (model, nf4):
        assert mansu.evaluate(m, tok, anchor, batch_size=64, progress=False).accuracy == 1.0
    # one paraphrase per item, taken in turn so that every template is asked, at about a quarter of the cost
    paraphrased = {name: [it.paraphrased()[i % len(it.paraphrases)] for i, it in enumerate(items)]
                   for name, items in sets.items()}

    def accuracies(model, groups: dict[str, list[Item]]) -> dict[str, float]:
        """Accuracy per group, from one batched evaluation of all of them."""
        flat = iter(mansu.evaluate(model, tok, sum(groups.values(), []), batch_size=64, progress=False).correct)
        return {name: sum(next(flat) for _ in items) / len(items) for name, items in groups.items()}

    for (name, full), quant, para in zip(accuracies(model, sets).items(), accuracies(nf4, sets).values(),
                                         accuracies(model, paraphrased).values()):
        assert full >= 0.95 and quant >= 0.95 and para >= 0.9, (name, full, quant, para)


def test_split_is_seeded_and_disjoint(capitals):
    forget, retain = split(capitals, 10, seed=3)
    assert len(forget) == 10 and len(retain) == len(capitals) - 10
    assert not set(forget) & set(retain)
    assert split(capitals, 10, seed=3) == (forget, retain) != split(capitals, 10, seed=4)


def test_train_on_paraphrases_moves_the_first_n_wordings_into_the_forget_set():
    items = [Item("a is", "x", ("x", "y"), ("A is", "Q: a?\nA:", "a, that is")), Item("b is", "y", ("x", "y"))]
    out = train_on_paraphrases(items, 2)
    assert out == [Item("a is", "x", ("x", "y"), ("a, that is",)), Item("b is", "y", ("x", "y")),
                   Item("A is", "x", ("x", "y")), Item("Q: a?\nA:", "x", ("x", "y"))]
    assert train_on_paraphrases(items, 0) == items
    with pytest.raises(mansu.MansuError, match=">= 0"):
        train_on_paraphrases(items, -1)


def test_prompt_variants_trim_only_a_shared_template_and_never_repeat_a_prompt():
    cities = [Item("The city of Munich is in", "Germany", ("Germany", "Italy")),
              Item("The city of Milan is in", "Italy", ("Germany", "Italy"))]
    kenya = Item("Kenya is a country in", "Africa", ("Africa", "Asia"))  # its first word names the fact
    kinds = ["trim1", "trim2", "quoted", "fact"]
    out = prompt_variants([*cities, kenya], kinds, avoid=[Item("of Milan is in", "Italy")])
    assert [(v.prompt, v.answer) for v in out] == [
        ("city of Munich is in", "Germany"), ("of Munich is in", "Germany"),
        ('Q: Complete: "The city of Munich is in ..."\nA:', "Germany"), ("Fact: The city of Munich is in", "Germany"),
        ("city of Milan is in", "Italy"),  # "of Milan is in" is a prompt of `avoid`
        ('Q: Complete: "The city of Milan is in ..."\nA:', "Italy"), ("Fact: The city of Milan is in", "Italy"),
        ('Q: Complete: "Kenya is a country in ..."\nA:', "Africa"), ("Fact: Kenya is a country in", "Africa")]
    assert all(v.choices == it.choices for v in out for it in [*cities, kenya] if it.answer == v.answer)
    assert prompt_variants(cities, []) == []
    assert prompt_variants([Item("The moon is", "round")], ["trim1"]) == []  # no other item shares its template
    with pytest.raises(mansu.MansuError, match="unknown prompt variant"):
        prompt_variants(cities, ["trim9"])
    with pytest.raises(mansu.MansuError, match="unknown prompt variant"):
        mansu.MansuConfig(forget_variants=("paraphrase",))


def test_encode_masks_prompt_and_padding(tokenizer):
    batch = encode(tokenizer, ["The capital of France is", "Hi"], ["Paris", "there you go"])
    for b, answer in enumerate([" Paris", " there you go"]):
        targets = batch.input_ids[b, 1:][batch.target_mask[b]]
        assert tokenizer.decode(targets) == answer
    assert batch.attention_mask.sum() == (batch.input_ids.shape[1] * 2 - (batch.attention_mask == 0).sum())
    assert [len(b) for b in batches(tokenizer, mansu.load_bundled("elements")[:5], batch_size=2)] == [2, 2, 1]


def test_odd_files_read_correctly_or_fail_naming_file_and_line(tmp_path):
    good = {"prompt": "The capital of France is", "answer": "Paris", "choices": ["Paris", "Rome"]}
    line = json.dumps(good, ensure_ascii=False)
    path = tmp_path / "d.jsonl"
    # a BOM, Windows and old-Mac line ends, blank lines, and a very long line all read as written
    long_prompt = "word " * 200_000 + "is"
    variants = [b"\xef\xbb\xbf" + line.encode() + b"\r\n\r\n" + line.encode() + b"\r\n",
                line.encode() + b"\r" + line.encode() + b"\r",
                b"\n\n  \n" + line.encode() + b"\n\n",
                json.dumps(good | {"prompt": long_prompt}).encode() + b"\n"]
    for data in variants:
        path.write_bytes(data)
        items = read_jsonl(path)
        assert {it.answer for it in items} == {"Paris"} and items[0].choices == ("Paris", "Rome")
    assert read_jsonl(path)[0].prompt == long_prompt
    path.write_bytes(line.encode() + b"\n" + json.dumps(good | {"prompt": "Caf\u00e9 is"}).encode("latin-1")
                     .replace(b"\\u00e9", "\u00e9".encode("latin-1")) + b"\n")
    with pytest.raises(mansu.MansuError, match=r"d.jsonl:2: not UTF-8 \(byte 0xe9"):
        read_jsonl(path)
    path.write_bytes(line.encode("utf-16"))
    with pytest.raises(mansu.MansuError, match="UTF-16"):
        read_jsonl(path)
    path.write_text(json.dumps(good | {"choice": ["Paris", "Rome"]}) + "\n")
    with pytest.raises(mansu.MansuError, match=r"d.jsonl:1: unknown field\(s\) \['choice'\]"):
        read_jsonl(path)
    path.write_text('{"prompt": "\\ud800 is", "answer": "x"}\n')
    with pytest.raises(mansu.MansuError, match="d.jsonl:1: .*lone surrogate"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "answer": "b", "choices": {"b": 1, "c": 2}}\n')
    with pytest.raises(mansu.MansuError, match="'choices' must be a list"):
        read_jsonl(path)


def test_check_disjoint_names_the_shared_prompt(capitals):
    forget, retain = split(capitals, 5, seed=0)
    mansu.data.check_disjoint(forget=forget, retain=retain, utility=None)
    with pytest.raises(mansu.MansuError, match=r"1 prompt\(s\) are in both the forget and the retain.*"
                       + forget[0].prompt):
        mansu.data.check_disjoint(forget=forget, retain=retain + forget[:1])
    with pytest.raises(mansu.MansuError, match="both the retain and the utility set"):
        mansu.data.check_disjoint(forget=forget, retain=retain, utility=retain[:2])


def test_paraphrases_round_trip_and_ask_the_same_fact(tmp_path):
    record = {"prompt": "The capital of France is", "answer": "Paris", "choices": ["Paris", "Rome"],
              "paraphrases": ["Q: What is the capital of France?\nA:", "France's capital city is"]}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (item,) = read_jsonl(path)
    assert item.to_dict() == record and Item(**record) == item
    assert [(p.prompt, p.answer, p.choices) for p in item.paraphrased()] == [
        (prompt, "Paris", ("Paris", "Rome")) for prompt in record["paraphrases"]]
    for bad in ("France's capital is", [""], [3]):
        with pytest.raises(mansu.MansuError, match="paraphrases"):
            load_items([record | {"paraphrases": bad}])


CORPUS = ["The capital of France is Paris", "The capital of Japan is Tokyo", "Hi there you go", "Q: Rome? A: Oslo"] * 8
PAIRS = [("The capital of France is", "Paris"), ("Hi", "there you go"), ("Q: Rome? A: ", "Oslo")]


def built_tokenizer(style: str):
    """A tiny BPE tokenizer built in code: 'llama2' (Llama-2 / Mistral v0.1 tokenizer.json: a normalizer that
    prepends the space marker), 'metaspace' (a Metaspace pre-tokenizer prepending it), 'gpt2' (byte-level)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # pieces end at spaces, as sentencepiece
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if style == "gpt2" else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=alphabet))
    if style == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.mark.parametrize("style", ["llama2", "metaspace", "gpt2", "smollm2"])
def test_answer_tokens_are_exactly_the_continuation(style, tokenizer):
    tok = tokenizer if style == "smollm2" else built_tokenizer(style)
    prompts, answers = zip(*PAIRS)
    batch = encode(tok, prompts, answers)
    for b, (prompt, answer) in enumerate(PAIRS):
        ids = batch.input_ids[b][batch.attention_mask[b].bool()]
        answer_ids = batch.input_ids[b, 1:][batch.target_mask[b]]
        text = prompt + mansu.data.continuation(prompt, answer)
        assert ids.tolist() == tok(text)["input_ids"]  # what the model reads is the text in one piece
        assert torch.equal(ids[len(ids) - len(answer_ids):], answer_ids)  # targets: the row's last tokens
        head = tok.decode(ids[: len(ids) - len(answer_ids)], skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=True) == text and text.startswith(head)
        assert text[len(head):].strip() == answer  # no stray space token: the answer is all the targets hold
        if style in ("gpt2", "smollm2"):  # byte-level decoding keeps a leading space
            assert tok.decode(answer_ids) == text[len(head):]


def test_relation_template_is_the_words_every_prompt_shares_around_its_subject():
    assert relation_template([it.prompt for it in load_bundled("capitals")]) == ("The capital of", "is")
    assert relation_template([it.prompt for it in load_bundled("continents")]) == ("", "is a country in")
    assert relation_template(["The capital of France is"] * 3) is None  # one distinct prompt: no subject varies
    assert relation_template(["a b", "a b c"]) is None  # "a b" keeps one word for its subject: "a" alone is shared
    assert relation_template(["The capital of France is", "Water boils at"]) is None
    # a mate asks the relation of a subject of at least one word
    forget = [Item(f"The capital of {c} is", "x", ("x", "y")) for c in ("France", "Peru")]
    asked = [Item(p, "x", ("x", "y")) for p in ("The capital of South Korea is", "The capital of is",
                                                "The currency of Peru is", "The capital of Chile was")]
    assert mansu.data.relation_mates(forget, asked) == asked[:1]
    template = ("The capital of", "is")
    assert [mansu.data.subject_of(it.prompt, template) for it in asked] == ["South Korea", None, None, None]
    assert mansu.data.subject_of("Peru is a country in", ("", "is a country in")) == "Peru"
    assert mansu.data.relation_text(template) == "The capital of ... is"
    assert mansu.data.relation_text(("", "is a country in")) == "... is a country in"
