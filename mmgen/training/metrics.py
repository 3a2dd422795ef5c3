"""Metric logging helpers: a window of step metrics, peak memory, and the PNG loss plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    """The loss curves (total and per modality) of a run's metrics.jsonl as a PNG."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss_")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
