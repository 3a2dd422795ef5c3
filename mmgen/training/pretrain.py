"""Pretraining entry point, one process per rank: ``python -m mmgen.training.pretrain CONFIG [key=value ...]``.

``training/pretrain.sh`` starts it under the ``deepspeed`` launcher (CPU or GPU, one or many nodes);
:func:`launch_pretrain` runs that script from Python (the quickstart does), and
:func:`mmgen.training.trainer.pretrain` is the same training in the calling process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.paths import REPO_ROOT, recipe_path
from mmgen.training.config import load_train_config
from mmgen.training.trainer import pretrain  # noqa: F401  (the in-process function)

PRETRAIN_SH = REPO_ROOT / "training" / "pretrain.sh"
# Set by a launcher for its children; a stale copy (from an in-process run) must not reach a new launch.
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def launch_pretrain(
    config_path: str | Path,
    overrides: list[str] | None = None,
    num_gpus: int = 1,
    hostfile: str | None = None,
    quiet: bool = False,
) -> Path:
    """Run ``training/pretrain.sh`` (the ``deepspeed`` launcher) in a subprocess; returns the bundle path.

    ``num_gpus`` is ranks per node (CPU processes when no GPU is visible); ``hostfile`` a DeepSpeed
    hostfile for multi-node runs."""
    overrides = list(overrides or [])
    path = recipe_path(config_path, "training").resolve()
    cfg = load_train_config(path, overrides)  # fail here, in one line, before any process starts
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["NUM_GPUS"] = str(num_gpus)
    env.setdefault("PYTHON", sys.executable)
    if hostfile:
        env["HOSTFILE"] = str(Path(hostfile).resolve())
    kw = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE} if quiet else {}
    proc = subprocess.run(["bash", str(PRETRAIN_SH), str(path), *overrides], env=env, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise MMGenError(
            f"pretraining failed (exit {proc.returncode}){': ' + tail[0] if tail else ''}; "
            "see the log above, or run with --launcher none to debug in one process"
        )
    final = Path(cfg.out_dir) / "final"
    if not (final / "config.json").is_file():
        raise MMGenError(f"pretraining finished but wrote no bundle at {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    # The launcher may append --local_rank; ranks read LOCAL_RANK from the environment instead.
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        final = pretrain(args[0], args[1:])
    except MMGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"bundle: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
