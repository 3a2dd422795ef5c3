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
