"""Checkpoints of the small trainers (image and audio tokenizers, the detokenizer): the model, its
optimizers and the RNG state of one step in safetensors + JSON (nothing is unpickled), the latest
one found again, and a run directory set up or resumed from it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmgen.config import save_config


def save_checkpoint(ckpt_dir: Path, model, opt, step: int, keep: int, extra_opts: dict | None = None) -> Path:
    """Model, optimizer(s) and RNG state of ``step``; ``extra_opts`` (name -> optimizer) are saved
    beside the main one (e.g. the PatchGAN discriminator's)."""
    d = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_step_{step:08d}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    tensors, groups = _optimizer_tensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": groups}
    for name, o in (extra_opts or {}).items():
        t, meta[f"{name}.param_groups"] = _optimizer_tensors(o)
        save_file(t, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)  # a checkpoint appears whole or not at all
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return d


def _optimizer_tensors(opt) -> tuple[dict, list]:
    osd = opt.state_dict()
    tensors = {
        f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
        for i, st in osd["state"].items()
        for k, v in st.items()
    }
    return tensors, osd["param_groups"]


def _load_optimizer(opt, tensors: dict, param_groups: list) -> None:
    state: dict = {}
    for key, v in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def prepare_run_dir(cfg) -> Path:
    """Set the trainer's thread count, create ``cfg.out_dir`` and save the resolved config into it
    (shared by every trainer with ``threads`` and ``out_dir`` fields). Seeding stays with the caller:
    some trainers must load models before drawing their first random numbers."""
    torch.set_num_threads(trainer_threads(cfg.threads))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def resume_or_start(out_dir: str | Path, resume: bool, model, opt, extra_opts: dict | None = None) -> int:
    """The step a run starts at: the latest checkpoint's when ``resume`` finds one (model, optimizers
    and RNG restored), else 0. Shared by every trainer that uses :func:`save_checkpoint`; its metric log
    takes the same step (:class:`mmgen.utils.metric_log.MetricLogger`)."""
    ckpt = latest_checkpoint(out_dir) if resume else None
    return 0 if ckpt is None else load_checkpoint(ckpt, model, opt, extra_opts)


def load_checkpoint(d: Path, model, opt, extra_opts: dict | None = None) -> int:
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    _load_optimizer(opt, tensors, meta["param_groups"])
    for name, o in (extra_opts or {}).items():
        _load_optimizer(o, load_file(str(d / f"{name}.safetensors")), meta[f"{name}.param_groups"])
    return int(meta["step"])


def trainer_threads(threads: int) -> int:
    """``threads`` when positive, else every core this process may use, at most 8."""
    if threads > 0:
        return threads
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))
