"""Interleaved generation: the grid constraint, the KV-cached sampling loop, CFG, modes and the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mmgen.processing.vocab import Vocab

from bundlekit import RES, TEXTS, PaletteTokenizer, bias_head


@pytest.fixture()
def bundle(bundle_dir):
    from mmgen.models.bundle import load_bundle

    return load_bundle(bundle_dir)


def _blocks(vocab: Vocab, ids: list[int]) -> list[list[int]]:
    """Every image block (from <image> to its end as declared) in a token list."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == vocab["<image>"]:
            if i + 3 > len(ids):
                out.append(ids[i:])
                break
            h = ids[i + 1] - vocab.h_start + 1
            w = ids[i + 2] - vocab.w_start + 1
            n = vocab.image_block_len(h, w)
            out.append(ids[i : i + n])
            i += n
        else:
            i += 1
    return out


# -- the constraint -------------------------------------------------------------------------------
@pytest.mark.parametrize("codebooks", [{"pix": 16}, {"sem": 8, "pix": 16}])
def test_constraint_matches_vocab_and_blocks_parse(codebooks):
    """Random scores under the constraint: every position allows exactly what the Vocab says, every
    block parses, size tokens stay within the allowed grids, and rows advance independently."""
    from mmgen.inference.constraints import ImageGridConstraint

    vocab = Vocab(50, codebooks, max_grid=6)
    sizes = [(2, 3), (3, 2), (4, 4)]
    proc = ImageGridConstraint(vocab, sizes=sizes)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    # Row 0 starts inside a block, row 1 in text, row 2 right after a finished block.
    rows = [
        [5, 6, vocab["<image>"]],
        [5, 6, 7],
        vocab.image_block(np.zeros((2, 3), int), None if "sem" not in codebooks else np.zeros((1, 2), int)),
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    text_ok = torch.zeros(vocab.size, dtype=torch.bool)
    text_ok[: vocab.text_size] = True
    for step in range(120):
        scores = torch.randn(3, vocab.size, generator=gen)
        masked = proc(ids, scores)
        for b in range(3):
            allowed = torch.isfinite(masked[b])
            row = ids[b].tolist()
            start = max((i for i, t in enumerate(row) if t == vocab["<image>"]), default=None)
            open_block = start is not None and proc.pos[b] > 0
            if open_block:
                spec = vocab.image_next_allowed(row[start:], sizes)
                want = torch.zeros(vocab.size, dtype=torch.bool)
                if isinstance(spec, tuple):
                    want[spec[0] : spec[1]] = True
                else:
                    want[spec] = True
            else:
                want = text_ok.clone()
                want[vocab["<image>"]] = True
            assert torch.equal(allowed, want), (step, b)
        # Row 1 opens an image now and then; otherwise each row samples among its allowed ids.
        nxt = []
        for b in range(3):
            choices = torch.nonzero(torch.isfinite(masked[b])).flatten().tolist()
            if proc.pos[b] == 0 and rng.random() < 0.3:
                nxt.append(vocab["<image>"])
            else:
                nxt.append(rng.choice(choices))
        ids = torch.cat([ids, torch.tensor(nxt)[:, None]], dim=1)
    n_blocks = 0
    for b in range(3):
        for block in _blocks(vocab, ids[b].tolist()):
            if len(block) < 3 or len(block) < vocab.image_block_len(
                block[1] - vocab.h_start + 1, block[2] - vocab.w_start + 1
            ):
                continue  # the block still open at the end of the loop
            parsed = vocab.parse_image_block(block)
            assert (parsed["h"], parsed["w"]) in sizes
            n_blocks += 1
    assert n_blocks >= 4
    assert sum(proc.completed) >= 3


def test_constraint_restricts_sizes_and_respects_budget():
    from mmgen.inference.constraints import ImageGridConstraint

    vocab = Vocab(40, {"pix": 8}, max_grid=8)
    img = vocab["<image>"]
    proc = ImageGridConstraint(vocab, sizes=[(4, 4)])
    s = proc(torch.tensor([[1, img]]), torch.zeros(1, vocab.size))
    assert torch.nonzero(torch.isfinite(s[0])).flatten().tolist() == [vocab["<h_4>"]]
    s = proc(torch.tensor([[1, img, vocab["<h_4>"]]]), torch.zeros(1, vocab.size))
    assert torch.nonzero(torch.isfinite(s[0])).flatten().tolist() == [vocab["<w_4>"]]
    # Outside a block: text and <image> only, no stray codes or structural tokens.
    s = proc(torch.tensor([[1, 2]]), torch.zeros(1, vocab.size))
    ok = torch.isfinite(s[0])
    assert ok[: vocab.text_size].all() and ok[img] and ok.sum() == vocab.text_size + 1
    # A 4x4 block is 26 tokens: with fewer left, <image> is not offered, so no image is ever cut off.
    need = vocab.image_block_len(4, 4)
    tight = ImageGridConstraint(vocab, sizes=[(4, 4)], max_length=2 + need - 1)
    assert not torch.isfinite(tight(torch.tensor([[1, 2]]), torch.zeros(1, vocab.size))[0, img])
    roomy = ImageGridConstraint(vocab, sizes=[(4, 4)], max_length=2 + need)
    assert torch.isfinite(roomy(torch.tensor([[1, 2]]), torch.zeros(1, vocab.size))[0, img])
    # Text-only: <image> forbidden.
    text_only = ImageGridConstraint(vocab, allow_images=False)
    assert not torch.isfinite(text_only(torch.tensor([[1, 2]]), torch.zeros(1, vocab.size))[0, img])


def test_constraint_works_inside_transformers_generate(bundle):
    """The processor plugs into model.generate: sampled batched t2i continuations all parse."""
    from mmgen.inference.constraints import ImageGridConstraint
    from mmgen.inference.generate import prompt_ids

    vocab = bundle.vocab
    ids = torch.tensor([prompt_ids(bundle, "a red circle", image=True)] * 2)
    n = vocab.image_block_len(4, 4) - 1
    proc = ImageGridConstraint(vocab, sizes=[(4, 4)])
    torch.manual_seed(0)
    out = bundle.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        logits_processor=[proc],
        do_sample=True,
        max_new_tokens=n,
        min_new_tokens=n,
        top_k=0,
        top_p=1.0,
        eos_token_id=None,
        pad_token_id=bundle.text_tokenizer.pad_token_id,
    )
    for r in range(2):
        block = out[r, ids.shape[1] - 1 :].tolist()
        parsed = vocab.parse_image_block(block)
        assert parsed["pix"].shape == (4, 4) and parsed["length"] == len(block)
    assert not torch.equal(out[0], out[1])  # two samples of one prompt, drawn independently


# -- the sampling loop -----------------------------------------------------------------------------
def _greedy_by_full_recompute(model, vocab: Vocab, row: list[int], steps: int) -> list[int]:
    """The reference for cached decoding: greedy tokens under the 4x4 grid constraint, each step
    running the model over the whole sequence so far."""
    from mmgen.inference.constraints import ImageGridConstraint

    seq = list(row)
    proc = ImageGridConstraint(vocab, sizes=[(4, 4)])
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[:, -1].float()
            seq.append(int(proc(torch.tensor([seq]), logits).argmax(-1)))
    return seq[len(row) :]


def test_kv_cache_and_left_padding_match_full_recompute(bundle):
    """Greedy decoding through the KV cache, batched with left padding, equals recomputing the whole
    sequence every step for each row alone."""
    from mmgen.inference.generate import prompt_ids, sample_tokens

    vocab = bundle.vocab
    tok = bundle.text_tokenizer
    rows = [prompt_ids(bundle, "a large red circle at the top left", image=True), prompt_ids(bundle, "a", image=True)]
    assert len(rows[0]) != len(rows[1])
    steps = 12
    got = [[], []]
    for t, _ in sample_tokens(
        bundle.model,
        vocab,
        rows,
        max_new_tokens=steps,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=0.0,
        sizes=[(4, 4)],
    ):
        for r in range(2):
            got[r].append(int(t[r]))
    for r, row in enumerate(rows):
        assert got[r] == _greedy_by_full_recompute(bundle.model, vocab, row, steps)


def test_t2i_generation_yields_decoded_image(bundle):
    from mmgen.data.doc import Image
    from mmgen.inference.generate import generate_interleaved

    doc = generate_interleaved(
        bundle, "a large red circle at the top left, on a black background.", mode="t2i", max_new_tokens=40, seed=3
    )
    assert isinstance(doc.items[0], Image)
    img = doc.items[0]
    assert img.meta["codes_shape"] == [4, 4]
    assert img.meta["num_tokens"] == bundle.vocab.image_block_len(4, 4)
    pil = img.to_pil()
    assert pil.size == RES
    # The image is exactly the decoder's rendering of some 4x4 code grid (patches of palette colours).
    arr = np.asarray(pil).reshape(4, 8, 4, 8, 3)
    assert (arr == arr[:, :1, :, :1]).all()
    assert doc.meta["new_tokens"] == 40 and doc.meta["stop"] == "max_new_tokens"


def test_generation_is_deterministic_by_seed(bundle):
    from mmgen.inference.generate import generate_interleaved

    def run(seed):
        doc = generate_interleaved(
            bundle, "a small blue square", mode="t2i", max_new_tokens=32, seed=seed, cfg_scale=2.0
        )
        return [it.text if it.kind == "text" else it.load() for it in doc.items]

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_cfg_guides_only_image_tokens_inside_blocks(bundle):
    from mmgen.inference.generate import prompt_ids, sample_tokens

    vocab = bundle.vocab
    tok = bundle.text_tokenizer
    seen = []

    def hook(cond, uncond, guided, in_block):
        seen.append((cond.clone(), uncond.clone(), guided.clone(), in_block.clone()))

    rows = [prompt_ids(bundle, "a large red circle", image=False), prompt_ids(bundle, "a green star", image=True)]
    uncond = [prompt_ids(bundle, "", image=False), prompt_ids(bundle, "", image=True)]
    assert uncond[0] == [tok.bos_token_id]
    list(
        sample_tokens(
            bundle.model,
            vocab,
            rows,
            max_new_tokens=6,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            seed=0,
            cfg_scale=3.0,
            uncond_rows=uncond,
            sizes=[(4, 4)],
            logits_hook=hook,
        )
    )
    assert len(seen) == 6
    text = slice(0, vocab.text_size)
    img = slice(vocab.text_size, vocab.size)
    for cond, unc, guided, in_block in seen:
        assert in_block.tolist() == [False, True]
        assert torch.equal(guided[0], cond[0])  # a text row is never guided
        assert torch.equal(guided[1, text], cond[1, text])
        assert torch.allclose(guided[1, img], unc[1, img] + 3.0 * (cond[1, img] - unc[1, img]))
        assert not torch.allclose(guided[1, img], cond[1, img])  # the unconditional row really differs


def test_text_mode_stops_at_eos_and_never_opens_an_image(bundle):
    from mmgen.inference.generate import generate_interleaved

    vocab = bundle.vocab
    eos = bundle.text_tokenizer.eos_token_id
    # The model now loves <image> and often ends: text mode must still write no image.
    bias_head(bundle, {vocab["<image>"]: 20.0, eos: 5.0})
    doc = generate_interleaved(bundle, "a large red circle", mode="text", max_new_tokens=200, seed=0)
    assert doc.meta["stop"] == "eos"
    assert 1 <= doc.meta["new_tokens"] < 200
    assert doc.images == []
    # Same model in auto mode: it opens an image at once.
    doc = generate_interleaved(bundle, "a large red circle", mode="auto", max_new_tokens=60, seed=0)
    assert len(doc.images) >= 1 and doc.items[0].kind == "image"


def test_generate_images_batched(bundle):
    from mmgen.inference.batch_generation import generate_images

    prompts = ["a red circle", "a blue square at the top", "a green star"]
    imgs = generate_images(bundle, prompts, seed=0, cfg_scale=2.0, batch_size=2)
    assert [im.size for im in imgs] == [RES] * 3
    arrays = [np.asarray(im) for im in imgs]
    assert not all(np.array_equal(arrays[0], a) for a in arrays[1:])
    again = generate_images(bundle, prompts, seed=0, cfg_scale=2.0, batch_size=2)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, again))


def test_bad_arguments_are_one_line_errors(bundle):
    from mmgen.errors import MMGenError
    from mmgen.inference.generate import generate_interleaved

    with pytest.raises(MMGenError, match="unknown mode"):
        generate_interleaved(bundle, "x", mode="video")
    with pytest.raises(MMGenError, match="too small for one image block"):
        generate_interleaved(bundle, "x", mode="t2i", max_new_tokens=5)
    with pytest.raises(MMGenError, match="cfg_scale"):
        generate_interleaved(bundle, "x", cfg_scale=0.5)


# -- the CLI -------------------------------------------------------------------------------------------
def test_cli_generate_writes_png(bundle_dir, tmp_path, capsys):
    from PIL import Image as PILImage

    from mmgen.cli import main

    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(bundle_dir),
            "--prompt",
            "a large red circle",
            "--mode",
            "t2i",
            "--seed",
            "1",
            "--cfg-scale",
            "2",
            "--max-new-tokens",
            "30",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    png = out / "image_0.png"
    assert f"[image 32x32: {png}]" in stdout
    with PILImage.open(png) as im:
        assert im.format == "PNG" and im.size == RES
    doc = json.loads((out / "doc.json").read_text())
    assert doc["items"][0]["type"] == "image" and doc["items"][0]["member"] == "image_0.png"
    assert doc["meta"]["cfg_scale"] == 2.0

    rc = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    assert rc == 2
    assert "error: " in capsys.readouterr().err


def test_t2i_with_the_pixel_vq_tokenizer(tmp_path):
    """The same path with the real pixel VQ (tiny, random): its 8x8 grid at 32 px becomes the block size."""
    from mmgen.inference.generate import generate_interleaved
    from mmgen.models.bundle import Bundle, load_bundle
    from mmgen.models.lm import build_tiny_lm
    from mmgen.models.text_tokenizer import train_text_tokenizer
    from mmgen.tokenizers.vq import PixelVQ

    tok = train_text_tokenizer(TEXTS, vocab_size=300)
    vq = PixelVQ(resolution=RES, channels=(8, 16), patch_size=2, codebook_size=32, code_dim=4, norm_groups=8)
    vocab = Vocab(len(tok), {"pix": 32}, max_grid=16)
    Bundle(build_tiny_lm(vocab, hidden=64, layers=1, heads=4, text_tokenizer=tok, seed=0), tok, vocab, vq, {}).save(
        tmp_path
    )
    bundle = load_bundle(tmp_path)
    assert type(bundle.image_tokenizer).__name__ == "PixelVQ"
    doc = generate_interleaved(
        bundle, "a red circle", mode="t2i", max_new_tokens=vocab.image_block_len(8, 8) - 1, seed=0, cfg_scale=2.0
    )
    img = doc.images[0]
    assert img.meta["codes_shape"] == [8, 8] and img.meta["num_tokens"] == vocab.image_block_len(8, 8)
    assert img.to_pil().size == RES


# -- 2-D grid positions ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["own-cell", "target-cell"])
def grid_bundle(tmp_path_factory, request):
    """A tiny unified model with grid position embeddings (of each code's own cell, or of the cell each
    input predicts), its table randomised so positions matter."""
    from mmgen.models.bundle import Bundle, load_bundle
    from mmgen.models.text_tokenizer import train_text_tokenizer
    from mmgen.models.unified_build import build_unified_lm

    tok = train_text_tokenizer(TEXTS, vocab_size=300)
    vocab = Vocab(len(tok), {"pix": 16}, max_grid=8)
    model = build_unified_lm(
        vocab, hidden=64, layers=2, heads=4, text_tokenizer=tok, seed=0, grid_positions=True, grid_target=request.param
    )
    with torch.no_grad():
        model.grid_position_embedding.weight[1:].normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("grid_bundle")
    Bundle(model, tok, vocab, PaletteTokenizer(), {"image_resolution": list(RES)}).save(path)
    return load_bundle(path)


def test_grid_positions_survive_save_load_and_change_the_logits(grid_bundle):
    model, vocab = grid_bundle.model, grid_bundle.vocab
    table = model.grid_position_embedding.weight
    side = 9 if model.config.grid_target else 8  # target cells run to column/row max_grid (before <eol>)
    assert table.shape == (1 + 2 * side * side, 64) and bool(table[1:].abs().sum() > 0) and not table[0].any()
    block = vocab.image_block(np.arange(16).reshape(4, 4) % 16)
    ids = torch.tensor([[1, *block]])
    with torch.no_grad():
        with_grid = model(ids).logits
        without = model(ids, grid_positions=torch.zeros_like(ids)).logits
    # the first token with a cell: the first code, or with target cells the <pix> that predicts it
    first = int((ids[0] >= vocab.code_range("pix")[0]).nonzero()[0]) - int(model.config.grid_target)
    assert torch.allclose(with_grid[0, :first], without[0, :first], atol=1e-5)  # before the first code: untouched
    assert not torch.allclose(with_grid[0, first:], without[0, first:], atol=1e-3)


def test_grid_positions_in_cached_decoding_match_full_recompute(grid_bundle):
    """Our cached loop and transformers' generate() hand each new code its grid cell: greedy tokens
    equal recomputing the whole sequence every step."""
    from mmgen.inference.constraints import ImageGridConstraint
    from mmgen.inference.generate import prompt_ids, sample_tokens

    b, vocab, tok = grid_bundle, grid_bundle.vocab, grid_bundle.text_tokenizer
    row = prompt_ids(b, "a large red circle at the top left", image=True)
    steps = vocab.image_block_len(4, 4) - 1
    want = _greedy_by_full_recompute(b.model, vocab, row, steps)
    assert len(set(want)) > 4  # positions vary the codes: the check is not trivially constant
    got = [
        int(t[0])
        for t, _ in sample_tokens(
            b.model,
            vocab,
            [row],
            max_new_tokens=steps,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            temperature=0.0,
            sizes=[(4, 4)],
        )
    ]
    assert got == want
    ids = torch.tensor([row])
    out = b.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        logits_processor=[ImageGridConstraint(vocab, sizes=[(4, 4)])],
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    assert out[0, len(row) :].tolist() == want


def test_grid_position_tail_equals_the_full_scan_on_every_prefix():
    """Cached decoding reads only a block-long window; on every prefix of a sequence with text, a full
    image block and a cut-off one, that window gives the same cells as scanning everything."""
    vocab = Vocab(100, {"sem": 16, "pix": 32}, max_grid=4)
    block = vocab.image_block(np.arange(16).reshape(4, 4) % 32, sem=np.arange(4).reshape(2, 2))
    ids = torch.tensor([[5, 6, *block, *[7] * 50, *block[:20]]])
    full = vocab.grid_position_ids(ids)
    assert full.max() > 1 + 4 * 4  # pixel cells appear, not only semantic ones
    for cut in range(1, ids.shape[1] + 1):
        assert torch.equal(vocab.grid_position_ids_tail(ids[:, :cut]), full[:, cut - 1 : cut])
    assert torch.equal(vocab.grid_position_ids_tail(ids, 30), full[:, -30:])
    target = vocab.grid_position_ids(ids, target=True)
    for cut in range(1, ids.shape[1] + 1):
        assert torch.equal(vocab.grid_position_ids_tail(ids[:, :cut], target=True), target[:, cut - 1 : cut])


def test_target_cells_name_the_cell_of_the_next_code():
    """With ``target=True`` every input that precedes a code carries that code's (branch, row, col), in a
    table of side max_grid + 1; an input followed by anything else carries the cell after it or none."""
    vocab = Vocab(100, {"sem": 16, "pix": 32}, max_grid=4)
    block = vocab.image_block(np.arange(12).reshape(3, 4) % 32, sem=np.arange(4).reshape(2, 2))
    ids = torch.tensor([[5, 6, *block, 7, *block]])
    own = vocab.grid_position_ids(ids)[0].tolist()
    target = vocab.grid_position_ids(ids, target=True)[0].tolist()
    G, side = 4, 5
    assert vocab.grid_table_size(True) == 1 + 2 * side * side and max(target) < vocab.grid_table_size(True)

    def cell(table_id, s):  # (branch, row, col) of a table row
        k = table_id - 1
        return k // (s * s), k % (s * s) // s, k % s

    tokens = ids[0].tolist()
    predicting_a_code = [t for t in range(len(tokens) - 1) if own[t + 1] > 0]
    assert len(predicting_a_code) == 2 * (12 + 4)
    for t in predicting_a_code:
        assert cell(target[t], side) == cell(own[t + 1], G), t
    # text, size tokens and closers predict no cell; the last code of a row points past the row (col 4)
    assert all(target[t] == 0 for t, x in enumerate(tokens) if x in (5, 6, 7, vocab["<image>"], vocab["</image>"]))
    last_of_row = [t for t in range(len(tokens) - 1) if own[t] > 0 and tokens[t + 1] == vocab["<eol>"]]
    assert {cell(target[t], side)[2] for t in last_of_row if cell(target[t], side)[0] == 1} == {4}
