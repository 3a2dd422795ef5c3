"""One metric log for every trainer: a run's rows go to ``metrics.jsonl`` (one JSON object per logged
step), to TensorBoard scalars (``tensorboard/``, under ``train/``) and, when the run ends, to the
``loss.png`` plot of its loss curves.

    log = MetricLogger(out_dir)
    log.log({"step": 10, "loss": 0.71, "lr": 1e-3})
    log.close()  # flushes TensorBoard, draws loss.png

The LM trainer, the image and audio tokenizer trainers, the detokenizer, CLIP and the quality scorer
all log through it, so their runs read the same way (``tensorboard --logdir runs``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Row keys that are bookkeeping, not curves.
NOT_SCALARS = ("step", "epoch", "elapsed_s")


class MetricLogger:
    """Appends rows to ``out_dir/metrics.jsonl`` and mirrors their numbers to TensorBoard.

    ``start_step`` is the step the run starts at: 0 for a new run, the checkpoint's step for a resumed
    one. Rows a stopped run logged after it are dropped from the JSONL, and TensorBoard is told to hide
    them (``purge_step``; steps count from 1), so the resumed steps appear once, as in an uninterrupted
    run; a new run in an old directory starts an empty log. ``enabled=False`` (ranks other than 0) makes
    every call a no-op; ``tensorboard=False`` keeps only the JSONL and the plot. ``loss_keys``: the
    curves of loss.png
    beside ``loss`` and every ``loss_*`` key."""

    def __init__(
        self,
        out_dir: str | Path,
        start_step: int = 0,
        tensorboard: bool = True,
        enabled: bool = True,
        loss_keys: tuple[str, ...] = (),
    ):
        self.out_dir, self.enabled, self.loss_keys = Path(out_dir), enabled, loss_keys
        self.path = self.out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step > 0 and self.path.is_file():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= start_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the events at purge_step and after: the first step this run logs
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> Path | None:
        """Flush TensorBoard and draw ``loss.png`` from every row of metrics.jsonl; returns the PNG."""
        if not self.enabled:
            return None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return plot_losses(self.path, self.out_dir / "loss.png", self.loss_keys)


def plot_losses(metrics_path: Path, png: Path, extra_keys: tuple[str, ...] = ()) -> Path | None:
    """The loss curves (``loss``, every ``loss_*`` and ``extra_keys``) of a metrics.jsonl as a PNG."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss_")}) + list(extra_keys)
    curves = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    curves = {k: pts for k, pts in curves.items() if pts}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    # a log axis only where every value can sit on it (an adversarial loss can be negative)
    if all(v > 0 and math.isfinite(v) for pts in curves.values() for _, v in pts):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
