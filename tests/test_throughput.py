"""tokens/s and MFU measure the steady updates: the first update of every start or resume (torch.compile's
compile, the device's warm-up) is left out of them (issue 31)."""

from types import SimpleNamespace

import pytest

from ltm import names
from ltm.flops import mfu
from ltm.loop import WARMUP_UPDATES, _Window

TOKENS_PER_STEP = 4096


def context(world: int = 1):
    plan = SimpleNamespace(tokens_per_step=TOKENS_PER_STEP, flops_per_token=1e9, peak_flops=1e15)
    return SimpleNamespace(plan=plan, procs=SimpleNamespace(world=world))


def test_the_first_update_of_a_start_counts_in_the_loss_but_not_in_tokens_per_s_or_mfu():
    assert WARMUP_UPDATES == 1
    window = _Window()
    window.add(2.0, 0.5, 120.0)  # compiles: two minutes
    window.add(1.0, 0.5, 0.5)
    window.add(1.0, 0.5, 0.5)
    point = window.metrics(context(world=2), lr=1e-3)
    assert point[names.TRAIN_LOSS] == pytest.approx(4.0 / 3)  # every update's loss
    assert point[names.TOKENS_PER_S] == pytest.approx(2 * TOKENS_PER_STEP / 1.0)  # the two steady ones
    assert point[names.MFU] == pytest.approx(mfu(2 * TOKENS_PER_STEP, 1e9, 1e15, 2))
    window.add(1.0, 0.5, 0.25)  # a later window of the same start is timed throughout
    assert window.metrics(context(), lr=1e-3)[names.TOKENS_PER_S] == pytest.approx(TOKENS_PER_STEP / 0.25)


def test_a_window_of_only_the_first_update_logs_no_throughput_and_a_resume_leaves_its_first_out_again():
    window = _Window()
    window.add(2.0, 0.5, 120.0)
    point = window.metrics(context(), lr=1e-3)
    assert names.TRAIN_LOSS in point and names.TOKENS_PER_S not in point and names.MFU not in point
    resumed = _Window()  # a resume (or requeue) starts a new window and compiles again
    resumed.add(1.0, 0.5, 90.0)
    resumed.add(1.0, 0.5, 1.0)
    assert resumed.metrics(context(), lr=1e-3)[names.TOKENS_PER_S] == pytest.approx(TOKENS_PER_STEP / 1.0)
