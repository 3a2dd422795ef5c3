"""Learning-rate schedules from transformers (mmgen.utils.schedules): shapes, floors, and a resumed
run placed where the uninterrupted one was."""

from __future__ import annotations

import pytest
import torch

from mmgen.errors import MMGenError


def _rates(schedule: str, steps: int, start: int = 0, state: dict | None = None, **kw) -> tuple[list[float], dict]:
    from mmgen.utils.schedules import lr_scheduler

    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    if state is not None:  # what a checkpoint restores: Adam's state and the groups (lr, initial_lr)
        opt.load_state_dict(state)
    sched = lr_scheduler(opt, schedule, kw.pop("warmup", 10), steps, start_step=start, **kw)
    rates = []
    for _ in range(start, steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if len(rates) == 40 and start == 0:
            state = opt.state_dict()
    return rates, state


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_the_floor(schedule):
    rates, _ = _rates(schedule, 100, min_lr_ratio=0.1)
    assert max(rates) == pytest.approx(1e-3) and rates[0] < rates[5] < rates[9]
    if schedule == "constant":
        assert rates[10:] == [pytest.approx(1e-3)] * 90
    else:
        assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # decays after the warmup
        assert rates[-1] == pytest.approx(1e-4, rel=0.15) and min(rates[10:]) >= 1e-4 * (
            1 - 1e-9
        )  # to the floor, not under


def test_a_resumed_scheduler_continues_the_uninterrupted_rates():
    full, state = _rates("cosine", 100, min_lr_ratio=0.05)
    resumed, _ = _rates("cosine", 100, start=40, state=state, min_lr_ratio=0.05)
    assert resumed == pytest.approx(full[40:], rel=1e-12)


def test_a_resume_that_changes_the_total_follows_its_own_schedule():
    """The optimizer state of a 60-step run holds that run's rate; resumed into a 100-step run, every step
    trains at the 100-step schedule's rate, the first one included."""
    full, _ = _rates("cosine", 100, min_lr_ratio=0.05)
    _, short_state = _rates("cosine", 60, min_lr_ratio=0.05)
    assert short_state["param_groups"][0]["lr"] != pytest.approx(full[40])
    resumed, _ = _rates("cosine", 100, start=40, state=short_state, min_lr_ratio=0.05)
    assert resumed == pytest.approx(full[40:], rel=1e-12)


def test_an_unknown_schedule_is_one_clear_line():
    from mmgen.utils.schedules import lr_scheduler

    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(MMGenError, match="schedule must be one of cosine, linear, constant"):
        lr_scheduler(opt, "triangular", 10, 100)
