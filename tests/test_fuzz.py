"""Fuzzing the inputs a user hands mansu: every data file, item list and config either loads or raises a
MansuError naming the problem, never another exception (issue #13). The counts tried are printed (-s)."""
import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mansu
from mansu.data import load_items, read_jsonl

TRIED: dict[str, int] = {}
EXAMPLES = 400


def counted(name):
    TRIED[name] = TRIED.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())))


def loads_or_mansu_error(load, *args):
    """The input loads, or the only exception is a MansuError with a message."""
    try:
        return load(*args)
    except mansu.MansuError as err:
        assert str(err)
        return None


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["Paris", "Rome", "", " ", "\ud800"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
# Records close to valid items, so that the field checks are reached, not only "not an object".
items = st.fixed_dictionaries({}, optional={"prompt": json_values | st.text(max_size=20),
                                            "answer": json_values | st.sampled_from(["Paris", "Rome"]),
                                            "choices": json_values | st.lists(st.sampled_from(["Paris", "Rome", "Oslo", ""]),
                                                                              max_size=4),
                                            "extra": json_values})


def encoded_lines(records):
    return b"\n".join(json.dumps(r).encode() for r in records)


file_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(items, max_size=4).map(encoded_lines),
    st.lists(items, max_size=4).map(encoded_lines).flatmap(
        lambda data: st.tuples(st.just(data), st.binary(max_size=8), st.integers(0, max(len(data), 1)))
        .map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2]:])),  # valid lines with stray bytes spliced in
    st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\r\n", b"[1]\n", b'"x"', b"9" * 5000, b"[" * 5000]),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=file_bytes)
def test_any_file_loads_or_raises_mansu_error(tmp_path, data):
    counted("data files")
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    loaded = loads_or_mansu_error(read_jsonl, path)
    assert loaded is None or all(isinstance(it, mansu.Item) for it in loaded)


@settings(max_examples=EXAMPLES, deadline=None)
@given(records=st.lists(items | json_values, max_size=4))
def test_any_item_list_loads_or_raises_mansu_error(records):
    counted("item lists")
    loaded = loads_or_mansu_error(load_items, records)
    for it in loaded or []:  # what loads is a valid item: its answer is among its choices
        assert it.prompt.strip() and (it.choices is None or it.answer in it.choices)


CONFIGS = [mansu.MansuConfig, mansu.BaselineConfig, mansu.CircuitConfig, mansu.FisherConfig,
           mansu.ProjectionConfig, mansu.BoundConfig]
config_values = st.one_of(scalars, st.floats(), st.integers(-3, 3), st.floats(-2, 2),
                          st.sampled_from(["npo", "ga", "graddiff", "nf4", "q4_0", "snap", "margin", "zero",
                                           "mean", "empirical", "true", "prune", "scale", "head", "neuron"]),
                          st.lists(st.sampled_from(["head", "neuron", "x"]), max_size=3),
                          st.dictionaries(st.sampled_from(["mass", "top_k", "steps", "bogus"]), scalars, max_size=3))


@settings(max_examples=EXAMPLES, deadline=None)
@given(cls=st.sampled_from(CONFIGS), data=st.data())
def test_any_config_builds_or_raises_mansu_error(cls, data):
    counted("configs")
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = data.draw(st.dictionaries(st.sampled_from(names), config_values, max_size=4))
    if cls is mansu.BoundConfig and "budget" not in kwargs:
        kwargs["budget"] = data.draw(config_values)
    config = loads_or_mansu_error(lambda: cls(**kwargs))
    if config is not None:  # what builds holds only finite numbers: NaN never slips into a run
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            assert not (isinstance(value, float) and not math.isfinite(value)), (f.name, value)
