"""The LM trainer's step metrics: a window of sums all-reduced over ranks, and peak memory (the rows go
to :class:`mmgen.utils.metric_log.MetricLogger`)."""

from __future__ import annotations

import time

import torch


def peak_rss_mib() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class MetricWindow:
    """Sums between two log lines, all-reduced over ranks when flushed."""

    def __init__(self, n_mod: int):
        self.n_mod = n_mod
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.v = torch.zeros(3 + 2 * self.n_mod, dtype=torch.float64)  # loss, micro, tokens, (ce, n) per modality

    def add(self, loss: float, stats: dict, tokens: int):
        self.v[0] += loss
        self.v[1] += 1
        self.v[2] += tokens
        for k, (ce, n) in stats.items():
            self.v[3 + 2 * k] += ce
            self.v[4 + 2 * k] += n

    def flush(self, world, done, n_rows, cfg, fill, lr, names, t_run) -> dict:
        v = self.v.clone()
        if world > 1:
            torch.distributed.all_reduce(v)
        elapsed = time.perf_counter() - self.t0
        steps = v[1].item() / (cfg.grad_accum * world)
        row = {
            "step": done,
            "loss": v[0].item() / max(steps, 1e-9),
            "lr": lr,
            "tokens_per_s": v[2].item() / max(elapsed, 1e-9),
            "fill_rate": fill,
            "epoch": done * cfg.grad_accum * world * cfg.micro_batch / n_rows,
            "elapsed_s": time.perf_counter() - t_run,
        }
        for k, name in enumerate(names):
            n = v[4 + 2 * k].item()
            if n:
                row[f"loss_{name}"] = v[3 + 2 * k].item() / n
        row["_tokens"] = int(v[2].item())
        self.reset()
        return row
