"""mmgen: a toolkit for unified multimodal models that read and write interleaved text, images,
speech and video with one decoder LLM. See DESIGN.md (shared) and README.md."""

__version__ = "0.1.0"

import os

# PyTorch's CPU threads (GNU OpenMP) spin while they wait for each other. When another process keeps a
# core busy, a spinning thread holds the core its partner needs: the tiny LM's two-thread training step
# took 1.6x as long beside a one-thread matmul loop (benchmarks/omp_wait.py, BENCHMARKS "OpenMP wait
# policy"), and far longer beside another training job. Sleeping waits cost 13% on a quiet machine;
# OMP_WAIT_POLICY=ACTIVE gets that back on a dedicated one. Read when the OpenMP runtime loads, so this
# must run before torch is imported; a policy the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mmgen.errors import MMGenError  # noqa: E402, F401  (the one user-facing error type)
