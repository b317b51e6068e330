"""Round logging: TensorBoard-like writers get add_scalar calls, wandb-like runs get log calls."""
import math

import pytest

import mansu
from mansu.data import Item

RECORD = {"round": 3, "forget_loss": 0.5, "moves": 20, "undone": True, "retain_nll_increase_full": math.nan,
          "note": "text"}


class Board:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


class Run:
    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((data, step))


def test_tensorboard_and_wandb_like_writers_get_each_numeric_field_at_the_round():
    board, run = Board(), Run()
    assert mansu.log_rounds(board)(RECORD) is None and mansu.log_rounds(run, prefix="u/")(RECORD) is None
    assert sorted(board.scalars) == [("unlearn/forget_loss", 0.5, 3), ("unlearn/moves", 20.0, 3),
                                     ("unlearn/undone", 1.0, 3)]  # NaN and text are left out
    assert run.logged == [({"u/forget_loss": 0.5, "u/moves": 20.0, "u/undone": 1.0}, 3)]


def test_anything_else_is_refused():
    with pytest.raises(mansu.MansuError, match="SummaryWriter"):
        mansu.log_rounds(print)


def test_unlearn_logs_every_check_to_a_real_summary_writer(tmp_path, tokenizer):
    from conftest import make_tiny

    summary_writer = pytest.importorskip("torch.utils.tensorboard").SummaryWriter
    forget = [Item("The capital of France is", "Paris", ("Paris", "Oslo"))]
    retain = [Item("The capital of Peru is", "Lima", ("Lima", "Rome"))]
    writer = summary_writer(tmp_path)
    result = mansu.unlearn(make_tiny("llama", tokenizer), tokenizer, forget, retain,
                           mansu.BaselineConfig(lr=1e-7, max_steps=2, eval_every=1, progress=False),
                           callback=mansu.log_rounds(writer))
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    checks = [(r["round"], r["forget_acc_full"]) for r in result.rounds if "forget_acc_full" in r]
    assert [(e.step, e.value) for e in events.Scalars("unlearn/forget_acc_full")] == checks and checks
