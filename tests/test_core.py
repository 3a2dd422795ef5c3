"""Core types: config loading, Vocab layout and the grid constraint."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from mmgen.config import load_config
from mmgen.errors import MMGenError
from mmgen.processing.vocab import Vocab


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Cfg:
    steps: int = 10
    name: str = "tiny"
    optim: Optim = field(default_factory=Optim)


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 0.01\n")
    cfg = load_config(Cfg, p, ["optim.betas=[0.8, 0.9]", "name=big"])
    assert cfg.steps == 5 and cfg.optim.lr == 0.01 and cfg.optim.betas == [0.8, 0.9] and cfg.name == "big"


def test_config_unknown_key_names_closest(tmp_path):
    with pytest.raises(MMGenError, match=r"unknown config key 'optim.lrr'.*did you mean 'lr'"):
        load_config(Cfg, None, ["optim.lrr=1"])
    with pytest.raises(MMGenError, match="expected int"):
        load_config(Cfg, None, ["steps=abc"])


def test_recipe_inherits_from_its_base_recipe(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\nname: base\noptim:\n  lr: 0.01\n  betas: [0.5, 0.6]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "v.yaml").write_text("base_recipe: ../base.yaml\noptim:\n  lr: 0.02\n")
    cfg = load_config(Cfg, tmp_path / "sub" / "v.yaml", ["name=cli"])
    # the variant's keys win, mappings merge key by key, the command line wins over both
    assert (cfg.steps, cfg.name, cfg.optim.lr, cfg.optim.betas) == (5, "cli", 0.02, [0.5, 0.6])
    (tmp_path / "loop.yaml").write_text("base_recipe: loop.yaml\n")
    with pytest.raises(MMGenError, match="inherits from itself"):
        load_config(Cfg, tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base_recipe: gone.yaml\n")
    with pytest.raises(MMGenError, match="config file not found: .*gone.yaml"):
        load_config(Cfg, tmp_path / "orphan.yaml")


def test_vocab_image_block_roundtrip_and_constraint():
    v = Vocab(100, {"sem": 16, "pix": 32, "audio": 20}, max_grid=8, audio_levels=2)
    rng = np.random.default_rng(0)
    pix, sem = rng.integers(0, 32, (4, 6)), rng.integers(0, 16, (2, 3))
    ids = v.image_block(pix, sem)
    assert len(ids) == v.image_block_len(4, 6)
    parsed = v.parse_image_block(ids)
    assert (parsed["pix"] == pix).all() and (parsed["sem"] == sem).all()
    # Every token of a well-formed block is allowed by the grid constraint, and nothing after it.
    for n, tok in enumerate(ids):
        allowed = v.image_next_allowed(ids[:n])
        assert (tok in allowed) if isinstance(allowed, list) else allowed[0] <= tok < allowed[1]
    assert v.image_next_allowed(ids) is None
    # A code where <eol> belongs is rejected by the parser.
    bad = list(ids)
    bad[ids.index(v["<eol>"])] = v.code_range("sem")[0]
    with pytest.raises(ValueError):
        v.parse_image_block(bad)
    audio = rng.integers(0, 10, (2, 7))
    assert (v.parse_audio_block(v.audio_block(audio)) == audio).all()
    assert v.modality_of([0, v["<image>"], v.code_range("pix")[0]]).tolist() == [0, 1, 3]


def test_vocab_save_load(tmp_path):
    v = Vocab(50, {"pix": 64})
    v.save(tmp_path)
    assert Vocab.load(tmp_path) == v
    with pytest.raises(MMGenError, match="no vocab.json"):
        Vocab.load(tmp_path / "missing")


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_mmgen_makes_openmp_wait_passively_unless_told_otherwise(given, expected):
    """Set before torch loads (the OpenMP runtime reads it then): spinning threads beside another busy
    process slowed the tiny LM's training step about tenfold (benchmarks/omp_wait.py)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, mmgen, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
