"""``mmgen eval lmms ARGS...``: lmms-eval's own command line (``lmms-eval ARGS...``), started after
mmgen's torchvision shim (:func:`mmgen.utils.compat.ensure_torchvision`).

Where torchvision matches torch (a CUDA install), ``lmms-eval --model mmgen ...`` works as it is. Next
to the CPU torch build that mmgen pins, PyPI's torchvision cannot load its compiled ops and lmms-eval
dies importing it, before any plug-in is read; this launcher applies the shim first and changes
nothing else: the arguments, the task registry and the ``mmgen`` model entry point are lmms-eval's.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from mmgen.errors import MMGenError
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()
    try:
        from lmms_eval.cli.dispatch import main as lmms_main
    except ImportError as e:
        raise MMGenError(f"lmms-eval is not installed ({e.name} missing): pip install 'mmgen[lmms]'") from None
    old = sys.argv
    sys.argv = ["lmms-eval", *argv]
    try:
        rc = lmms_main()
    except SystemExit as e:
        rc = e.code
    finally:
        sys.argv = old
    return int(rc or 0)
