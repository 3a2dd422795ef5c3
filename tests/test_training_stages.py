"""Training stages end to end on a ~50k-parameter model: align (only new parts learn), SFT with LoRA
from a bundle, a two-rank run that equals one rank with the doubled batch, and continuous audio input
through the audio projector."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmgen.errors import MMGenError

from trainkit import CODEBOOK, TINY_AUDIO_CODEC, tiny_run, write_audio_shard, write_color_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_color_shard(tmp_path_factory.mktemp("codes"), 24)


@pytest.fixture(scope="module")
def pixel_vq(tmp_path_factory):
    from mmgen.tokenizers.vq import PixelVQ

    out = tmp_path_factory.mktemp("vq")
    torch.manual_seed(0)
    PixelVQ(
        resolution=(16, 16), channels=(8, 16), patch_size=2, code_dim=8, codebook_size=CODEBOOK, norm_groups=4
    ).save_pretrained(out)
    return out


def _over(shards, out_dir, **kw):
    return tiny_run(
        shards,
        out_dir,
        {
            "data.codebook_size": CODEBOOK,
            "data.text_vocab_size": 300,
            "data.max_grid": 8,
            "data.seq_len": 64,
            "model.hidden": 32,
            "model.layers": 2,
            "model.heads": 2,
            "grad_accum": 1,
            "save_every": 10,
            "tensorboard": False,
            "optim.lr": 1e-2,
            "steps": 2,
        },
        **kw,
    )


@pytest.fixture(scope="module")
def align_run(shards, pixel_vq, tmp_path_factory):
    from mmgen.training.trainer import pretrain

    out = tmp_path_factory.mktemp("align")
    final = pretrain(
        "tiny_align",
        _over(
            shards,
            out,
            **{
                "data.image_tokenizer": str(pixel_vq),
                "data.codebook_size": "null",
                "model.image_feature_dim": 8,
                "model.code_head": "true",
            },
        ),
    )
    return out, final


def test_align_trains_only_projector_code_head_and_new_rows(align_run):
    from mmgen.models.bundle import load_bundle
    from mmgen.models.unified_build import build_unified_lm

    out, final = align_run
    bundle = load_bundle(final)
    init = build_unified_lm(
        bundle.vocab,
        hidden=32,
        layers=2,
        heads=2,
        max_len=64,
        seed=0,
        code_head=True,
        image_feature_dim=8,
        text_tokenizer=bundle.text_tokenizer,
    )
    got, want = bundle.model.state_dict(), init.state_dict()
    assert got.keys() == want.keys()
    text = bundle.vocab.text_size
    emb_key = "lm.model.embed_tokens.weight"
    changed = {k for k in got if not torch.equal(got[k], want[k])}
    # the model stores the pixel VQ's code vectors it reads (not trained: a frozen table)
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.training.model_setup import code_vectors

    torch.testing.assert_close(
        got["image_code_vectors"], code_vectors(load_image_tokenizer(final / "image_tokenizer"), "pix")
    )
    assert bundle.model.config.code_vectors == ["image"]
    changed.discard("image_code_vectors")
    assert changed and all(
        k.startswith(("image_projector", "code_head")) or k in (emb_key, "lm.lm_head.weight") for k in changed
    ), changed
    assert any(k.startswith("image_projector") for k in changed) and "code_head.weight" in changed
    assert torch.equal(got[emb_key][:text], want[emb_key][:text])  # the text rows did not move at all
    assert not torch.equal(got[emb_key][text:], want[emb_key][text:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "align" and summary["trainable_parameters"] < summary["parameters"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_text", "loss_pix", "tokens_per_s", "fill_rate", "lr"} <= rows[-1].keys()
    assert (out / "loss.png").stat().st_size > 1000


def test_sft_with_lora_from_a_bundle(align_run, shards, tmp_path):
    from mmgen.models.bundle import load_bundle
    from mmgen.models.unified import MMGenForCausalLM
    from mmgen.training.trainer import sft

    _, start = align_run
    out = tmp_path / "sft"
    final = sft(
        "tiny_sft",
        _over(
            shards,
            out,
            init_from=str(start),
            **{"lora.enabled": "true", "lora.r": 4, "data.codebook_size": "null", "model.code_head": "true"},
        ),
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "sft"
    assert summary["trainable_parameters"] < 0.2 * summary["parameters"]  # adapters only
    assert (out / "lora_adapter" / "adapter_config.json").is_file()
    # QA docs: only answers are targets; caption docs: the image is the answer
    assert summary["data"]["sequences"]["sequences"] == 24
    bundle = load_bundle(final)
    assert isinstance(bundle.model, MMGenForCausalLM) and bundle.meta["stage"] == "sft"
    a, b = bundle.model.state_dict(), load_file(start / "model.safetensors")
    q = "lm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])  # the merged adapter changed the attention projections
    mlp = "lm.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[mlp], b[mlp])  # and nothing outside the LoRA targets


def test_two_ranks_equal_one_rank_with_the_doubled_batch(shards, tmp_path):
    """Each rank reads its own rows (RowSampler), DeepSpeed averages the gradients over gloo and the
    loss is the token mean of the global batch: the weights equal a single rank's with twice the rows."""
    from mmgen.training.pretrain import launch_pretrain
    from mmgen.training.trainer import pretrain

    two = launch_pretrain(
        "tiny_pretrain",
        _over(
            shards,
            tmp_path / "two",
            micro_batch=1,
            grad_accum=2,
            threads=1,
            **{"data.image_tokenizer": "null", "loss.prompt_dropout": 0.0},
        ),
        num_gpus=2,
        quiet=True,
    )
    one = pretrain(
        "tiny_pretrain",
        _over(
            shards,
            tmp_path / "one",
            micro_batch=2,
            grad_accum=2,
            **{"data.image_tokenizer": "null", "loss.prompt_dropout": 0.0},
        ),
    )
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    from mmgen.models.bundle import load_bundle
    from mmgen.models.unified_build import build_unified_lm

    a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    ref = load_bundle(one)
    init = build_unified_lm(
        ref.vocab,
        hidden=32,
        layers=2,
        heads=2,
        max_len=64,
        seed=0,
        text_tokenizer=ref.text_tokenizer,
        grid_positions=ref.model.config.grid_positions,
    ).state_dict()
    assert a.keys() == b.keys()
    # Adam's steps are ~lr = 1e-2: the runs agree to 1/100 of a step, where a different batch moves
    # weights by whole steps. (Gradient sums in another order differ in the last float bits, and Adam
    # magnifies that for the few weights whose gradient is ~0.)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 5e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    la = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5) and la[1] != la[0]


@pytest.fixture(scope="module")
def audio_codec_dir(tmp_path_factory):
    from mmgen.tokenizers.audio import AudioCodec

    out = tmp_path_factory.mktemp("codec")
    torch.manual_seed(0)
    AudioCodec.from_config(TINY_AUDIO_CODEC).save_pretrained(out)
    return out


def test_audio_features_train_the_audio_projector(audio_codec_dir, tmp_path):
    from mmgen.models.bundle import load_bundle
    from mmgen.models.unified_build import build_unified_lm
    from mmgen.training.trainer import pretrain

    shards = write_audio_shard(tmp_path / "codes", 8, levels=2, codebook=16)
    # No weight decay and untied embeddings: a weight moves only when a gradient reaches it.
    over = {
        "data.audio_tokenizer": str(audio_codec_dir),
        "model.audio_feature_dim": 16,
        "optim.weight_decay": 0,
        "model.tie_embeddings": "false",
        "steps": 1,
    }
    final = pretrain(None, _over(shards, tmp_path / "run", **over))
    bundle = load_bundle(final)
    assert bundle.vocab.config.audio_levels == 2
    assert bundle.vocab.ranges["audio"][1] - bundle.vocab.ranges["audio"][0] == 32
    init = build_unified_lm(
        bundle.vocab,
        hidden=32,
        layers=2,
        heads=2,
        max_len=64,
        seed=0,
        audio_feature_dim=16,
        tie_embeddings=False,
        text_tokenizer=bundle.text_tokenizer,
    ).state_dict()
    got = bundle.model.state_dict()
    emb = "lm.model.embed_tokens.weight"
    a, b = bundle.vocab.code_range("audio")
    # the features replace the audio codes' input rows, so those rows get no gradient; the projector does
    assert torch.equal(got[emb][a:b], init[emb][a:b])
    assert not torch.equal(got["audio_projector.0.weight"], init["audio_projector.0.weight"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_audio" in rows[-1]

    with pytest.raises(MMGenError, match="audio_feature_dim=8 but .* 16-dimensional"):
        pretrain(None, _over(shards, tmp_path / "bad", **{**over, "model.audio_feature_dim": 8}))
    with pytest.raises(MMGenError, match="needs data.audio_tokenizer"):
        pretrain(None, _over(shards, tmp_path / "none", **{**over, "data.audio_tokenizer": "null"}))
    with pytest.raises(MMGenError, match="input_placement=placeholder: code shards carry codes"):
        pretrain(None, _over(shards, tmp_path / "ph", **{**over, "model.input_placement": "placeholder"}))


def test_a_run_leaves_no_shared_memory_buffer_behind(tmp_path):
    """DeepSpeed's CPU all-reduce buffer (/dev/shm) is unlinked once the ranks have mapped it, and the
    collective still works through the mapping."""
    import os
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from mmgen.training.distributed import init_distributed\n"
        "init_distributed()\n"
        "maps = sorted({w for l in open('/proc/self/maps') for w in l.split() if 'deepspeed_allreduce_buffer' in "
        "w})\n"
        "t = torch.ones(3)\n"
        "torch.distributed.all_reduce(t)\n"
        "print(len(maps), all(not os.path.exists(p) for p in maps), t.tolist())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n, gone, total = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(n) >= 1 and gone == "True" and total == "[1.0, 1.0, 1.0]"


def test_orphaned_shared_memory_buffers_are_swept_and_mapped_or_young_ones_kept(tmp_path):
    """A run killed before it released its all-reduce buffer leaves the file in /dev/shm; the next start
    removes it when it is old and no process maps it, and keeps one that a process maps or that is young."""
    import os
    import subprocess
    import sys
    import time
    import uuid

    from mmgen.training.distributed import ORPHAN_SHM_SECONDS, sweep_orphan_shm_buffers

    prefix = f"/dev/shm/mmgen_test_buffer_{uuid.uuid4().hex}"
    orphan, mapped, young = (f"{prefix}_{n}" for n in ("orphan", "mapped", "young"))
    old = time.time() - ORPHAN_SHM_SECONDS - 60
    for p in (orphan, mapped, young):
        with open(p, "wb") as f:
            f.write(b"\0" * 4096)
    for p in (orphan, mapped):
        os.utime(p, (old, old))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mmap, sys, time\n"
            f"f = open({mapped!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096); f.close()\n"
            "print('mapped', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert sweep_orphan_shm_buffers(prefix) == [orphan]
        assert not os.path.exists(orphan) and os.path.exists(mapped) and os.path.exists(young)
    finally:
        holder.kill()
        holder.wait()
        assert sweep_orphan_shm_buffers(prefix) == [mapped]  # its last mapping went with the process
        os.unlink(young)
