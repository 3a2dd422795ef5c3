"""mmgen: a toolkit for unified multimodal models that read and write interleaved text, images,
speech and video with one decoder LLM. See DESIGN.md (shared) and README.md."""

__version__ = "0.1.0"

from mmgen.errors import MMGenError  # noqa: F401  (the one user-facing error type)
