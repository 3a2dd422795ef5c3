"""Code blocks (mmgen.tokenizers.blocks): table fitting, lossless round trips for blocks in the table,
the nearest-entry fallback, save/load, pre-tokenization, DualViTok's semantic grid, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen.errors import MMGenError

VQ = {"channels": [8, 16], "layers_per_block": 1, "patch_size": 2, "code_dim": 4, "codebook_size": 32, "norm_groups": 4}


@pytest.fixture(scope="module")
def inner():
    from mmgen.tokenizers.vq import PixelVQ

    torch.manual_seed(0)
    return PixelVQ(resolution=(32, 32), **VQ).eval()  # 8x8 codes: 4x4 blocks of 2x2


def scenes(n, seed=0, side=32):
    import random

    from mmgen.world import random_scene, render

    rng = random.Random(seed)
    return [render(random_scene(rng, "val"), side, side) for _ in range(n)]


def test_fit_ranks_blocks_by_count_and_reports_coverage():
    from mmgen.tokenizers.blocks import blocks_of, fit_block_table

    a, b, c = [[1, 1], [1, 1]], [[2, 3], [4, 5]], [[7, 7], [7, 6]]
    grid1 = np.block([[np.array(a), np.array(b)], [np.array(a), np.array(a)]])  # a x3, b x1
    grid2 = np.block([[np.array(b), np.array(c)], [np.array(a), np.array(b)]])  # a x1, b x2, c x1
    assert blocks_of(grid1, 2)[0, 1].tolist() == [2, 3, 4, 5]  # a block is read row-major
    table, stats = fit_block_table([grid1, grid2], block=2, min_count=2)
    assert table.tolist() == [[1, 1, 1, 1], [2, 3, 4, 5]]  # a (4), b (3); c (1) is under min_count
    assert stats["blocks"] == 8 and stats["distinct"] == 3 and stats["coverage"] == pytest.approx(7 / 8)
    table, _ = fit_block_table([grid1, grid2], block=2, max_size=1, min_count=1)
    assert table.tolist() == [[1, 1, 1, 1]]
    with pytest.raises(MMGenError, match="does not split"):
        fit_block_table([np.zeros((3, 4), int)], block=2)


def test_blocks_in_the_table_round_trip_exactly(inner):
    from mmgen.tokenizers.blocks import CodeBlockTokenizer, fit_block_table

    images = scenes(12)
    pix = inner.encode(images)
    table, stats = fit_block_table(pix.numpy(), block=2, min_count=1)
    assert stats["coverage"] == 1.0
    tok = CodeBlockTokenizer(inner, table, block=2)
    blocks = tok.encode(images)
    assert blocks.shape == (12, 4, 4) and tok.code_shape(32, 32) == (4, 4) and tok.downsample == 8
    assert torch.equal(tok.from_blocks(blocks), pix)
    assert torch.equal(tok.encode(images), blocks)  # deterministic
    # decoding blocks is decoding their pixel codes with the inner tokenizer
    assert torch.equal(tok.decode_tensor(blocks), inner.decode_tensor(pix))
    assert len(tok.decode(blocks[0])) == 1


def test_a_block_outside_the_table_becomes_the_nearest_entry(inner):
    from mmgen.tokenizers.blocks import CodeBlockTokenizer

    tok = CodeBlockTokenizer(inner, np.array([[0, 0, 0, 0], [1, 1, 1, 1]]), block=2)
    grid = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 1]]])  # left block 0,0,0,1 (3 of 4 like entry 0), right 1,1,1,1
    assert tok.to_blocks(grid).tolist() == [[[0, 1]]]
    grid = torch.tensor([[[1, 0], [1, 1]]])  # 1,0,1,1: 3 of 4 like entry 1
    assert tok.to_blocks(grid).tolist() == [[[1]]]


def test_save_load_and_pretokenize(inner, tmp_path):
    from mmgen.data.code_shards import read_code_shards
    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.blocks import CodeBlockTokenizer, fit_code_blocks
    from mmgen.tokenizers.pretokenize import pretokenize
    from mmgen.world import write_world

    inner.save_pretrained(tmp_path / "vq")
    write_world(tmp_path / "world", n_docs=16, seed=2, size=32, progress=False)
    pretokenize(tmp_path / "vq", str(tmp_path / "world"), tmp_path / "codes", batch_size=8, progress=False)
    fit_code_blocks(tmp_path / "vq", str(tmp_path / "codes"), tmp_path / "blocks", block=2, min_count=1, splits=None)
    tok = load_image_tokenizer(tmp_path / "blocks")
    assert isinstance(tok, CodeBlockTokenizer) and tok.fit_stats["coverage"] == 1.0
    images = scenes(4, seed=5)
    assert torch.equal(tok.encode(images), tok.to_blocks(inner.encode(images)))
    s = pretokenize(
        tmp_path / "blocks", str(tmp_path / "world"), tmp_path / "block_codes", batch_size=8, progress=False
    )
    assert s["codebooks"] == {"pix": tok.codebook_size} and s["images_encoded"] > 0
    plain = {c.doc.id: c.codes for c in read_code_shards(str(tmp_path / "codes"))}
    n = 0
    for c in read_code_shards(str(tmp_path / "block_codes")):
        for i, grid in c.codes.items():  # every image's blocks are exactly its fitted pixel codes
            assert np.array_equal(tok.from_blocks(torch.as_tensor(grid)[None])[0].numpy(), plain[c.doc.id][i])
            n += 1
    assert n == s["images_encoded"]
    # the code shards rewritten for the block tokenizer are what tokenizing the pictures again writes
    from mmgen.tokenizers.blocks import reblock_code_shards

    r = reblock_code_shards(tmp_path / "blocks", str(tmp_path / "codes"), tmp_path / "reblocked", progress=False)
    assert (r["docs_in"], r["docs_written"], r["images_reblocked"]) == (s["docs_written"], s["docs_written"], n)
    again = {c.doc.id: c for c in read_code_shards(str(tmp_path / "block_codes"))}
    got = list(read_code_shards(str(tmp_path / "reblocked")))
    assert [c.doc.id for c in got] == list(again)
    for c in got:
        want = again[c.doc.id]
        assert c.codes.keys() == want.codes.keys() and c.sem.keys() == want.sem.keys()
        assert all(
            np.array_equal(c.codes[i], want.codes[i]) and c.codes[i].dtype == want.codes[i].dtype for i in c.codes
        )
        assert c.doc.to_json() == want.doc.to_json()
    with pytest.raises(MMGenError, match="no code-block tokenizer"):
        reblock_code_shards(tmp_path / "vq", str(tmp_path / "codes"), tmp_path / "nope", progress=False)


def test_dualvitok_semantic_grid_passes_through(tmp_path):
    from mmgen.backbones.clip import build_open_clip, save_clip
    from mmgen.tokenizers.blocks import CodeBlockTokenizer, fit_block_table
    from mmgen.tokenizers.dualvitok_train import build_dualvitok_from_config

    from trainkit import TEACHER_CFG, tiny_dualvitok_cfg  # the same tiny DualViTok and CLIP teacher

    torch.manual_seed(0)
    teacher = str(save_clip(build_open_clip(TEACHER_CFG), tmp_path / "clip", TEACHER_CFG))
    dual = build_dualvitok_from_config(tiny_dualvitok_cfg(tmp_path / "t", teacher)).eval()
    images = scenes(6)
    codes = dual.encode(images)
    tok = CodeBlockTokenizer(
        dual, fit_block_table(codes["pix"].numpy(), dual.sem_ratio, min_count=1)[0], dual.sem_ratio
    )
    assert tok.codebook_sizes == {"sem": dual.codebook_sizes["sem"], "pix": tok.codebook_size} and tok.sem_ratio == 1
    out = tok.encode(images)
    assert torch.equal(out["sem"], codes["sem"]) and out["pix"].shape == out["sem"].shape
    assert tok.tokens_per_image(32, 32) == 2 * out["pix"][0].numel()
    assert torch.equal(tok.decode_tensor(out), dual.decode_tensor(codes))
    tok.save_pretrained(tmp_path / "blocks")
    again = CodeBlockTokenizer.from_pretrained(tmp_path / "blocks")
    assert torch.equal(again.encode(images)["pix"], out["pix"])


def test_bad_tables_and_codes_are_clear_errors(inner):
    from mmgen.tokenizers.blocks import CodeBlockTokenizer

    with pytest.raises(MMGenError, match="inner pixel codebook"):
        CodeBlockTokenizer(inner, np.array([[0, 0, 0, 99]]), block=2)
    with pytest.raises(MMGenError, match=r"\(K, 4\)"):
        CodeBlockTokenizer(inner, np.array([[0, 0, 0]]), block=2)
    tok = CodeBlockTokenizer(inner, np.array([[0, 0, 0, 0]]), block=2)
    with pytest.raises(MMGenError, match="out of range"):
        tok.decode(torch.tensor([[0, 1]]))


def test_fit_blocks_cli(inner, tmp_path):
    from typer.testing import CliRunner

    from mmgen.cli import app
    from mmgen.tokenizers.pretokenize import pretokenize
    from mmgen.world import write_world

    inner.save_pretrained(tmp_path / "vq")
    write_world(tmp_path / "world", n_docs=12, seed=4, size=32, progress=False)
    pretokenize(tmp_path / "vq", str(tmp_path / "world"), tmp_path / "codes", batch_size=8, progress=False)
    args = [
        "fit-blocks",
        "--tokenizer",
        str(tmp_path / "vq"),
        "--codes",
        str(tmp_path / "codes"),
        "--out",
        str(tmp_path / "blocks"),
        "--block",
        "2",
        "--max-size",
        "5",
        "--min-count",
        "1",
        "--split",
        "all",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "5 blocks kept of" in res.output and (tmp_path / "blocks" / "inner" / "config.json").is_file()
    res = CliRunner().invoke(app, [*args[:-6], "--block", "3"])  # 8x8 codes do not split into 3x3 blocks
    assert res.exit_code != 0 and "does not split" in str(res.exception or res.output)
    # 2x2 blocks of 8x8 codes are a 4x4 grid, not one block per ShapesWorld cell: nothing to label
    res = CliRunner().invoke(app, [*args, "--compose-world"])
    assert res.exit_code != 0 and "one block per labelled cell" in str(res.exception or res.output)


@pytest.fixture(scope="module")
def composed():
    """A 36-px PixelVQ (9x9 codes: one 3x3 block per ShapesWorld cell), a table fitted on the probes of
    train-split pairs only, and that table composed with every probe (held-out pairs included)."""
    from mmgen.tokenizers.blocks import CodeBlockTokenizer, compose_blocks, fit_block_table
    from mmgen.tokenizers.vq import PixelVQ
    from mmgen.world import render
    from mmgen.world.probes import object_probes
    from mmgen.world.scene import HELDOUT_PAIRS

    torch.manual_seed(0)
    vq = PixelVQ(resolution=(36, 36), **{**VQ, "patch_size": 2}).eval()
    probes = object_probes(cells=((1, 1),))
    shown = [(s, lab) for s, lab in probes if (s.objects[0].color, s.objects[0].shape) not in HELDOUT_PAIRS]
    table, _ = fit_block_table(vq.encode([render(s, 36, 36) for s, _ in shown]).numpy(), block=3, min_count=1)
    fitted = CodeBlockTokenizer(vq, table, block=3)
    return fitted, compose_blocks(fitted, probes, lambda s: render(s, 36, 36)), probes


def test_composed_blocks_add_every_probe_object_with_its_label(composed, tmp_path):
    from mmgen.tokenizers.blocks import CodeBlockTokenizer, blocks_of
    from mmgen.world import render
    from mmgen.world.scene import HELDOUT_PAIRS

    fitted, tok, probes = composed
    n = len(fitted.table)
    assert tok.fitted_rows == n and torch.equal(tok.table[:n], fitted.table)  # fitted rows keep their ids
    assert len(tok.table) > n and tok.fit_stats["composed"] == len(tok.table) - n
    # a held-out pair's object is written exactly by a composed row carrying its label
    for scene, labels in probes:
        obj = scene.objects[0]
        if (obj.color, obj.shape) not in HELDOUT_PAIRS:
            continue
        pix = tok.inner.encode([render(scene, 36, 36)])[0].numpy()
        row = tok._index.get(tuple(blocks_of(pix, 3)[1, 1].tolist()))
        if row is not None and tok.labels[row] is not None:
            assert tok.labels[row] == labels[(1, 1)]
    held = {(lab["color"], lab["shape"]) for lab in tok.labels[n:] if lab["kind"] == "object"}
    assert HELDOUT_PAIRS <= held  # every pair no fitted picture showed can now be written
    tok.save_pretrained(tmp_path / "composed")
    back = CodeBlockTokenizer.from_pretrained(tmp_path / "composed")
    assert back.labels == tok.labels and back.fitted_rows == n and torch.equal(back.table, tok.table)


def test_a_block_under_two_labels_stays_unlabelled_and_probes_must_label_each_block(composed):
    from mmgen.tokenizers.blocks import compose_blocks
    from mmgen.world import render

    fitted, _, probes = composed
    scene, labels = probes[0]
    clash = {cell: {"kind": "other"} if cell == (1, 1) else lab for cell, lab in labels.items()}
    tok = compose_blocks(fitted, [(scene, labels), (scene, clash)], lambda s: render(s, 36, 36))
    pix = tok.inner.encode([render(scene, 36, 36)])[0].numpy()
    from mmgen.tokenizers.blocks import blocks_of

    assert tok.labels[tok._index[tuple(blocks_of(pix, 3)[1, 1].tolist())]] is None
    with pytest.raises(MMGenError, match="one block per labelled cell"):
        compose_blocks(fitted, [(scene, {(0, 0): labels[(0, 0)]})], lambda s: render(s, 36, 36))


def test_block_factor_rows_are_attribute_sums_in_the_embedding_and_the_logits(composed):
    from mmgen.models.block_factors import BlockFactors, block_attributes
    from mmgen.processing.vocab import Vocab

    _, tok, _ = composed
    vocab = Vocab(text_size=40, codebooks={"pix": len(tok.table)})
    ids, features, fitted, names = block_attributes(tok, vocab)
    assert len(ids) == sum(lab is not None for lab in tok.labels) and not fitted.all()  # composed rows too
    assert {"color=red", "shape=triangle", "kind=empty"} <= set(names)
    torch.manual_seed(1)
    factors = BlockFactors(vocab.size, len(ids), len(names), 8)
    factors.set_table(ids, features)
    factors.fit_rows(torch.randn(len(ids), 8), fitted)
    rows = factors.rows(torch.float32)
    start, _ = vocab.code_range("pix")
    by_label = {}
    for r, i in enumerate(ids.tolist()):
        lab = tok.labels[i - start]
        if lab["kind"] == "object":
            by_label[(lab["color"], lab["shape"], lab["size"], lab["background"])] = rows[r]
    checked = 0  # additive in colour and shape, held-out pairs included
    for (c, s, z, bg), w in by_label.items():
        for c2, s2 in (("orange", "square"), ("cyan", "cross")):
            if c2 != c and s2 != s and all(k in by_label for k in ((c, s2, z, bg), (c2, s, z, bg), (c2, s2, z, bg))):
                across = by_label[(c, s2, z, bg)] + by_label[(c2, s, z, bg)]
                torch.testing.assert_close(w + by_label[(c2, s2, z, bg)], across)
                checked += 1
    assert checked > 10
    # inputs: labelled ids read their sums, every other id its own row; outputs: their columns likewise
    table = torch.randn(vocab.size, 8)
    input_ids = torch.tensor([[1, int(ids[0]), start + len(tok.table) - 1, int(ids[-1])]])
    embeds = factors.embed(table[input_ids], input_ids)
    assert torch.equal(embeds[0, 0], table[1]) and torch.equal(embeds[0, 1], rows[0])
    assert torch.equal(embeds[0, 3], rows[-1])
    hidden = torch.randn(1, 4, 8)
    logits = factors.logits(hidden @ table.T, hidden)
    torch.testing.assert_close(logits[..., ids], hidden @ rows.T)
    keep = torch.ones(vocab.size, dtype=torch.bool)
    keep[ids] = False
    torch.testing.assert_close(logits[..., keep], (hidden @ table.T)[..., keep])
