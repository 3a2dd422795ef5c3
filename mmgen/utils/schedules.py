"""Learning-rate schedules of every mmgen trainer, from transformers' scheduler library: a linear warmup
from 0 (step ``s < warmup`` trains at ``s / warmup`` of the peak), then a cosine or linear decay to a floor
(``min_lr_ratio`` of the peak), or a constant rate.

    sched = lr_scheduler(opt, "cosine", warmup_steps=20, total_steps=3000, min_lr_ratio=0.05, start_step=start)
    for step in range(start, total):
        ...  # the step trains at opt.param_groups[i]["lr"]
        opt.step()
        sched.step()

A resumed run passes the step it resumes at: the scheduler starts there from each parameter group's
``initial_lr`` (kept in the optimizer state a checkpoint saves), so the rates after a resume are those of
an uninterrupted run."""

from __future__ import annotations

from mmgen.errors import MMGenError
from mmgen.utils.compat import ensure_torchvision

SCHEDULES = ("cosine", "linear", "constant")


def lr_scheduler(
    optimizer,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    start_step: int = 0,
    peak_lr: float | None = None,
):
    """A ``torch.optim.lr_scheduler.LambdaLR`` from transformers for ``schedule``, positioned at
    ``start_step``. ``peak_lr`` fills ``initial_lr`` for groups that lack it (an optimizer restored from a
    checkpoint written before any scheduler ran); otherwise a group's current lr is its peak."""
    if schedule not in SCHEDULES:
        raise MMGenError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise MMGenError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    ensure_torchvision()  # transformers' optimization module imports its image utilities
    from transformers import optimization

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"] if peak_lr is None else peak_lr)
    last = start_step - 1  # torch's convention: the scheduler steps once on construction
    if schedule == "cosine":
        return optimization.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio, last_epoch=last
        )
    if schedule == "linear":
        # decays the optimizer's default lr to lr_end: a floor of min_lr_ratio of the peak
        peak = optimizer.defaults["lr"]
        return optimization.get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, lr_end=peak * min_lr_ratio, power=1.0, last_epoch=last
        )
    return optimization.get_constant_schedule_with_warmup(optimizer, warmup_steps, last_epoch=last)
