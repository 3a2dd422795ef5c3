"""mmgen: a toolkit for unified multimodal models that read and write interleaved text, images,
speech and video with one decoder LLM. See DESIGN.md (shared) and README.md."""

__version__ = "0.1.0"

import os

# PyTorch's CPU threads (GNU OpenMP) spin while they wait for each other. When another process keeps a
# core busy, a spinning thread holds the core its partner needs: the tiny LM's two-thread training step
# then takes about ten times as long (benchmarks/omp_wait.py, BENCHMARKS "OpenMP wait policy"). Threads
# that sleep while they wait lose little on a quiet machine. Read when the OpenMP runtime loads, so this
# must run before torch is imported; a policy the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mmgen.errors import MMGenError  # noqa: E402, F401  (the one user-facing error type)
