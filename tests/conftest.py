"""Shared fixtures. Tests never touch the network; real media come from ../shared/data/real/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep each xdist worker to one intra-op thread: two workers share CI's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
REAL = (ROOT / ".." / "shared" / "data" / "real").resolve()


@pytest.fixture(scope="session")
def real_dir() -> Path:
    assert REAL.is_dir(), f"real media folder missing: {REAL}"
    return REAL


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A tiny random bundle (``bundlekit.make_tiny_bundle``), one per test module: tests may change its files."""
    from bundlekit import make_tiny_bundle

    path = tmp_path_factory.mktemp("tiny_bundle")
    make_tiny_bundle(path)
    return path


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory) -> Path:
    """A tiny random bundle that can speak (``bundlekit.make_speech_bundle``), one per test module."""
    from bundlekit import make_speech_bundle

    return make_speech_bundle(tmp_path_factory.mktemp("speech_bundle"))


@pytest.fixture()
def speech(speech_dir):
    """The speaking bundle, loaded afresh for each test."""
    from mmgen.models.bundle import load_bundle

    return load_bundle(speech_dir)


@pytest.fixture(scope="module")
def detok_bundle(tmp_path_factory) -> Path:
    """A tiny bundle saved with a tiny random 1x and 2x detokenizer (``bundlekit.make_detok_bundle``)."""
    from bundlekit import make_detok_bundle

    return make_detok_bundle(tmp_path_factory.mktemp("detok_bundle"))
