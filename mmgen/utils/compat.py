"""Compatibility shims for the environments mmgen runs in.

torchvision wheels on PyPI are built against CUDA torch. Next to a CPU-only torch build their C++
extension cannot load, and torchvision's import then dies registering fake kernels for ``nms`` and
``qnms`` on ops that do not exist. Only the compiled ops (nms, roi_align, ...) are lost; the
transforms and models that timm and open_clip use are pure Python. :func:`ensure_torchvision`
imports torchvision and, only if that exact failure happens, defines the two op schemas (without
kernels) and imports it again. Call it before importing timm, open_clip or torchvision.
"""

from __future__ import annotations

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}
_lib = None  # the torch.library.Library must stay alive while the schemas are in use


def ensure_torchvision():
    global _lib
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return sys.modules["torchvision"]
    try:
        import torchvision

        return torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _lib = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, op):
            _lib.define(schema)
    import torchvision

    return torchvision


# -- torch C++ extension locks -------------------------------------------------------------------
STALE_LOCK_SECONDS = 600


def _builder_alive(build_dir) -> bool:
    """Whether a process works in ``build_dir`` (ninja and the compilers it starts run there). Without
    ``/proc`` (not Linux) nothing can be seen, so the answer is no and the lock's age decides alone."""
    import os
    from pathlib import Path

    target = os.path.realpath(build_dir)
    for pid in Path("/proc").glob("[0-9]*"):
        try:
            if os.path.realpath(pid / "cwd") == target:
                return True
        except OSError:
            continue  # gone, or not ours to read
    return False


def clear_stale_extension_locks(max_age_s: float = STALE_LOCK_SECONDS) -> list[str]:
    """Remove torch C++-extension build locks older than ``max_age_s`` with no process building in
    their directory; returns what was removed.

    DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op on the first run, and
    ``torch.utils.cpp_extension`` guards the build with a ``lock`` file that the builder deletes
    when done. A run killed mid-build (Ctrl-C on a first run) leaves the file behind, and every later
    run then waits on it forever without a word. A build takes well under a minute on an idle machine
    but can take more than ten under memory pressure, so age alone is not enough: a lock is stale only
    when, besides being old, no process (ninja, a compiler) works in its build directory."""
    import os
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    # Locks sit in <root>/<name>/ when TORCH_EXTENSIONS_DIR is set, else in <root>/py311_cpu/<name>/.
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in list(root.glob("*/lock")) + list(root.glob("*/*/lock")):
        try:
            if time.time() - lock.stat().st_mtime <= max_age_s or _builder_alive(lock.parent):
                continue  # a live builder may hold it
            lock.unlink()
        except OSError:
            continue  # another rank removed it, or it is not ours to remove
        removed.append(str(lock))
        print(f"mmgen: removed a stale torch extension build lock (a build killed earlier): {lock}", file=sys.stderr)
    return removed


def register_auto_model(config_cls, model_cls, auto_cls) -> None:
    """Make ``AutoConfig`` and ``auto_cls`` (``AutoModel``, ``AutoModelForCausalLM``, ...) know
    ``config_cls.model_type``, so a saved directory loads without ``trust_remote_code``. Idempotent:
    registering again in the same process is a no-op."""
    from transformers import AutoConfig

    try:
        AutoConfig.register(config_cls.model_type, config_cls)
    except ValueError:  # already registered in this process
        pass
    try:
        auto_cls.register(config_cls, model_cls)
    except ValueError:
        pass
