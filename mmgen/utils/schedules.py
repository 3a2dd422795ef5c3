"""Learning-rate schedules of every mmgen trainer, from transformers' scheduler library: a linear warmup
from 0 (step ``s < warmup`` trains at ``s / warmup`` of the peak, as in transformers' Trainer), then a
cosine or linear decay to a floor (``min_lr_ratio`` of the peak), or a constant rate.

    sched = lr_scheduler(opt, "cosine", warmup_steps=20, total_steps=3000, min_lr_ratio=0.05, start_step=start)
    for step in range(start, total):
        ...  # the step trains at opt.param_groups[i]["lr"]
        opt.step()
        sched.step()

The rates always come from the run's own configuration, never from a checkpoint: a resumed run passes the
step it resumes at (or calls :func:`seek` after a restore, as the DeepSpeed trainer does), and the next
step trains at the rate the schedule gives that step. A checkpoint's optimizer state holds the rate its
last step set, which belongs to that run's schedule: when a resume changes the total steps or the peak,
that stale rate would train one step and the run would drift from an uninterrupted one.
"""

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
    ``start_step``. The peak is ``peak_lr`` (default: the optimizer's ``lr``) for every group."""
    if schedule not in SCHEDULES:
        raise MMGenError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise MMGenError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    ensure_torchvision()  # transformers' optimization module imports its image utilities
    from transformers import optimization

    peak = optimizer.defaults["lr"] if peak_lr is None else peak_lr
    for group in optimizer.param_groups:
        group["initial_lr"] = peak  # torch's schedulers scale each group's initial_lr
    if schedule == "linear" and min_lr_ratio == 1.0:
        schedule = "constant"  # transformers' linear decay needs a floor under the peak
    # built at step 0 (torch's schedulers step once on construction), then placed at start_step
    if schedule == "cosine":
        sched = optimization.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio
        )
    elif schedule == "linear":
        sched = optimization.get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, lr_end=peak * min_lr_ratio, power=1.0
        )
    else:
        sched = optimization.get_constant_schedule_with_warmup(optimizer, warmup_steps)
    return seek(sched, start_step)


def seek(sched, step: int):
    """Place a ``LambdaLR`` at ``step``: the optimizer's groups get the rates the schedule gives that step
    (from the scheduler's own peaks), whatever a restored optimizer state held."""
    rates = [base * f(step) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, rate in zip(sched.optimizer.param_groups, rates):
        group["lr"] = rate
    sched.last_epoch = step
    sched._last_lr = rates  # what get_last_lr() reports, as step() would have set it
    return sched
