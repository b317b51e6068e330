"""The examples run: on a tiny random model (the plumbing and the certificate), and the hardening ones on the
embedded model, where issue #12's bar is asserted (forget <= 0.35 full and NF4, utility drop <= 0.05, certificate 1.0)."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def examples():
    """Import an example by name (examples/ on the path, as when it runs as a script)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("name", ["harden", "custom_loop", "peft_lora"])
def test_hardening_examples_certify_what_the_other_method_could_not(examples, name):
    if name == "peft_lora":
        pytest.importorskip("peft")
    result, unhardened, hardened = examples(name).main(smoke=True)
    assert result.method == "harden" and result.certificate.certified
    # the other method's sub-bin edit leaves most changed weights on their NF4 code; hardening's all flip
    assert unhardened.flipped_fraction < 0.9
    assert hardened.flipped_fraction == 1.0 and hardened.collateral == 0


def test_hardening_options_reach_the_configs_and_the_saved_result(tmp_path):
    """--harden and --edit change HardenConfig's and its edit loop's fields; --json saves the result."""
    saved = tmp_path / "result.json"
    subprocess.run([sys.executable, str(EXAMPLES / "harden.py"), "--smoke", "--harden",
                    '{"top_fraction": 0.1, "direction": "descent"}', "--edit", '{"edits_per_round": 30}',
                    "--json", str(saved)], check=True, capture_output=True)
    config = json.loads(saved.read_text())["config"]
    assert (config["top_fraction"], config["direction"], config["edit"]["edits_per_round"]) == (0.1, "descent", 30)
    assert config["edit"]["max_rounds"] == 2  # the smoke config's other fields stay


def test_trainer_callback_hardens_at_train_end(examples):
    result, numbers = examples("trainer_callback").main(smoke=True)
    assert result.certificate.certified and result.edited > 0
    assert numbers.flipped_fraction == 1.0 and numbers.collateral == 0


def test_check_checkpoints_tells_a_sub_bin_nudge_from_a_floored_edit(examples):
    nudged, floored = examples("check_checkpoints").smoke()
    assert not nudged.certified and nudged["nf4"].flipped == 0 and nudged["nf4"].changed > 0
    assert floored.certified and floored["nf4"].changed > 0


def test_quickstart_notebook_runs_top_to_bottom_and_is_stored_without_outputs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = EXAMPLES / "quickstart.ipynb"
    stored = json.loads(path.read_text())
    code = [c for c in stored["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    monkeypatch.setenv("MANSU_SMOKE", "1")
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "certified=True" in text and "forget accuracy full" in text
    assert (tmp_path / "attribution.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.bar
@pytest.mark.parametrize("name", ["harden", "custom_loop", "peft_lora"])
def test_hardening_examples_meet_the_bar_on_the_embedded_model(examples, name):
    if name == "peft_lora":
        pytest.importorskip("peft")
    result, unhardened, hardened = examples(name).main(smoke=False)
    assert unhardened.forget_nf4 > unhardened.forget_full  # the starting point: NF4 remembers
    # the bar; harden's own stop (0.1 in full precision and six formats) is stricter, and reported as
    # result.converged / stop_reason, not asserted here
    assert result.certificate.certified and hardened.meets_targets(), hardened


@pytest.mark.slow
@pytest.mark.bar
def test_trainer_callback_meets_the_bar_on_the_embedded_model(examples):
    result, numbers = examples("trainer_callback").main(smoke=False)
    assert result.certificate.certified and numbers.meets_targets(), numbers  # the bar, as above
