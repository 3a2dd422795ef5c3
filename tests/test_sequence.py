"""Text tokenizer, sequence layout and packing of coded documents for the unified LM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen.data.code_shards import CodedDoc
from mmgen.data.doc import Doc, Image, Text, Video
from mmgen.data.packing import IGNORE_INDEX, causal_lm_loss, pack_sequences, packed_batch, split_at_boundaries
from mmgen.errors import MMGenError
from mmgen.models.text_tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_text_tokenizer
from mmgen.processing.sequence import build_sequence, build_sequences, encode_prompt
from mmgen.processing.vocab import Vocab

CAPTIONS = [
    "a red circle at the top left.",
    "two blue squares at the bottom right.",
    "a green star in the center.",
    "a yellow triangle at the top right.",
    "three purple circles on a white background.",
]


def _placeholder_image(i: int) -> Image:
    return Image(path=f"<codes:{i}>", format="png")


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(CAPTIONS * 20, vocab_size=400)


@pytest.fixture(scope="module")
def vocab(tok):
    return Vocab(len(tok), {"pix": 64}, max_grid=8)


def caption_doc(text: str, rng, grid=(4, 4)) -> CodedDoc:
    doc = Doc(items=[Text(text), _placeholder_image(1)])
    return CodedDoc(doc, codes={1: rng.integers(0, 64, size=grid)})


def test_text_tokenizer_round_trip_special_ids_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [PAD_ID, UNK_ID, BOS_ID, EOS_ID]
    assert 260 < len(tok) <= 400  # merges stop early when pairs get rarer than min_frequency
    for text in CAPTIONS + ["an unseen word: zebra-ünïcode 42!"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert BOS_ID not in ids and EOS_ID not in ids  # special tokens are placed by sequence.py only
        assert tok.decode(ids) == text
    # BPE learned merges: a seen caption takes far fewer tokens than bytes
    assert len(tok.encode(CAPTIONS[0], add_special_tokens=False)) < len(CAPTIONS[0]) / 2
    # deterministic: same texts give the same vocabulary
    assert train_text_tokenizer(CAPTIONS * 20, vocab_size=400).get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == tok.get_vocab()
    assert back.encode(CAPTIONS[1], add_special_tokens=False) == tok.encode(CAPTIONS[1], add_special_tokens=False)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    # runs of spaces and tabs read as one space, also after a reload; newlines are kept
    typed = CAPTIONS[1].replace(" ", "  ", 2).replace(" ", "\t", 1)
    assert typed != CAPTIONS[1]
    for t in (tok, back):
        assert t.encode(typed, add_special_tokens=False) == t.encode(CAPTIONS[1], add_special_tokens=False)
        assert t.decode(t.encode("a\n\nb  c", add_special_tokens=False)) == "a\n\nb c"


def test_build_sequence_layout_and_prompt_agreement(tok, vocab):
    rng = np.random.default_rng(0)
    cd = caption_doc(CAPTIONS[0], rng)
    seq = build_sequence(cd, tok, vocab)
    ids = seq["input_ids"]
    prompt = encode_prompt(CAPTIONS[0], tok, vocab)
    # the text-to-image prompt is exactly the start of the training sequence
    assert list(ids[: len(prompt)]) == prompt
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    start = len(prompt) - 1
    parsed = vocab.parse_image_block(ids[start:-1])
    assert np.array_equal(parsed["pix"], cd.codes[1])
    assert start + parsed["length"] == len(ids) - 1
    assert tok.decode(ids[1:start]) == CAPTIONS[0]
    assert seq["loss_mask"][0] == 0 and seq["loss_mask"][1:].all()
    assert seq["boundaries"] == [1, start, len(ids) - 1]
    assert set(np.unique(seq["modality"])) == {0, 1, 2}  # text, structural, pix codes

    # image-only loss (text-to-image): text tokens are not targets, image tokens are
    t2i = build_sequence(cd, tok, vocab, targets=("image", "structural"))
    assert not t2i["loss_mask"][1:start].any() and t2i["loss_mask"][start:].all()


def test_build_sequence_interleaved_skips_and_counts(tok, vocab):
    rng = np.random.default_rng(1)
    doc = Doc(
        items=[
            Text("step one:"),
            Text("a red circle."),
            _placeholder_image(2),
            Video(path="clip.mp4", format="mp4"),
            Text("now a blue square."),
            _placeholder_image(5),
            _placeholder_image(6),
        ]
    )
    codes = {2: rng.integers(0, 64, size=(3, 5)), 5: rng.integers(0, 64, size=(1, 2, 2))}
    cd = CodedDoc(doc, codes=codes)  # item 6 has no codes
    seq = build_sequence(cd, tok, vocab)
    assert seq["skipped"] == {"video_not_supported": 1, "image_without_codes": 1}
    ids = list(seq["input_ids"])
    b = seq["boundaries"]
    # two consecutive text items are one text span, joined by a space
    assert tok.decode(ids[b[0] : b[1]]) == "step one: a red circle."
    assert np.array_equal(vocab.parse_image_block(ids[b[1] : b[2]])["pix"], codes[2])
    assert tok.decode(ids[b[2] : b[3]]) == "now a blue square."
    assert np.array_equal(vocab.parse_image_block(ids[b[3] : b[4]])["pix"], codes[5][0])

    seqs, stats = build_sequences([cd, CodedDoc(Doc(items=[Video(path="v.mp4", format="mp4")]))], tok, vocab)
    assert stats.docs_in == 2 and stats.sequences == 1 and stats.empty_docs == 1
    assert stats.skipped_items["video_not_supported"] == 2


def test_packing_layout_fill_and_split_at_item_boundaries(tok, vocab):
    rng = np.random.default_rng(2)
    seqs = [build_sequence(caption_doc(CAPTIONS[i % 5], rng, grid=(2 + i % 3, 3)), tok, vocab) for i in range(9)]
    lengths = [len(s["input_ids"]) for s in seqs]
    L = 64
    rows, stats = pack_sequences(seqs, L)
    assert stats.tokens == sum(lengths) and stats.docs_split == 0 and stats.docs_dropped == 0
    assert stats.rows == rows["input_ids"].shape[0] and stats.rows < len(seqs)
    assert stats.fill_rate == pytest.approx(sum(lengths) / (stats.rows * L))
    assert stats.rows == int(np.ceil(sum(lengths) / L)) or stats.fill_rate > 0.7
    for r in range(stats.rows):
        seg, pos = rows["segment_ids"][r], rows["position_ids"][r]
        for s in np.unique(seg[seg >= 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart per doc
            assert rows["labels"][r, where[0]] == IGNORE_INDEX  # no target across a doc boundary
            d = rows["doc_index"][r, where[0]]
            assert np.array_equal(rows["input_ids"][r, where], seqs[d]["input_ids"])
    # every document placed exactly once
    placed = [int(d) for r in range(stats.rows) for d in np.unique(rows["doc_index"][r]) if d >= 0]
    assert sorted(placed) == list(range(len(seqs)))

    # a long interleaved document is split at item boundaries, never inside an image block
    items, codes = [], {}
    for k in range(4):
        items += [Text(CAPTIONS[k]), _placeholder_image(2 * k + 1)]
        codes[2 * k + 1] = rng.integers(0, 64, size=(4, 4))
    long = build_sequence(CodedDoc(Doc(items=items), codes=codes), tok, vocab)
    block = vocab.image_block_len(4, 4)
    L2 = block + 20
    pieces = split_at_boundaries(long, L2)
    assert len(pieces) > 1 and sum(len(p["input_ids"]) for p in pieces) == len(long["input_ids"])
    for p in pieces:
        ids = list(p["input_ids"])
        assert len(ids) <= L2 and not p["loss_mask"][0]
        opens = [i for i, x in enumerate(ids) if x == vocab["<image>"]]
        closes = [i for i, x in enumerate(ids) if x == vocab["</image>"]]
        assert len(opens) == len(closes)
        for o in opens:
            vocab.parse_image_block(ids[o:])  # complete block inside the piece
    rows2, st2 = pack_sequences([long, seqs[0]], L2)
    assert st2.docs_split == 1 and st2.docs_dropped == 0 and st2.tokens == len(long["input_ids"]) + lengths[0]
    # a row shorter than one image block: the document cannot be split, so it is dropped and counted
    _, st3 = pack_sequences([long, seqs[0]], block - 1)
    assert st3.docs_dropped == 1 and st3.docs == 2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_separate_losses(tok, vocab, attn):
    from mmgen.models.lm import build_tiny_lm

    rng = np.random.default_rng(3)
    seqs = [build_sequence(caption_doc(CAPTIONS[i], rng, grid=(2 + i % 2, 3)), tok, vocab) for i in range(4)]
    model = build_tiny_lm(vocab, hidden=32, layers=2, heads=4, max_len=256, attn_implementation=attn, seed=0).eval()
    rows, stats = pack_sequences(seqs, 128)
    assert stats.rows == 1  # all four documents share one row
    with torch.no_grad():
        batch = packed_batch(rows, [0])
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        packed = causal_lm_loss(logits, batch["labels"], reduction="sum")
        separate = 0.0
        for s in seqs:
            ids = torch.from_numpy(s["input_ids"])[None]
            labels = torch.where(torch.from_numpy(s["loss_mask"])[None], ids, IGNORE_INDEX)
            separate += causal_lm_loss(model(input_ids=ids).logits, labels, reduction="sum")
        # without the block-diagonal mask the documents would see each other: the loss must differ
        plain = causal_lm_loss(
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
            batch["labels"],
            reduction="sum",
        )
    assert packed.item() == pytest.approx(separate.item(), rel=1e-4)
    assert abs(plain.item() - separate.item()) > 1e-3


def _merged_video(rng, books: dict, frames: int = 5, grid=(4, 6)):
    """Random per-frame codes with ~60% of the cells of non-key frames merged (-1); frame 3 a keyframe."""
    keys = [t in (0, 3) for t in range(frames)]
    out = {}
    for name, n in books.items():
        shape = grid if name == "pix" else tuple(-(-s // 2) for s in grid)
        codes = rng.integers(0, n, size=(frames, *shape))
        merged = (rng.random(codes.shape) < 0.6) & ~np.asarray(keys)[:, None, None]
        out[name] = np.where(merged, -1, codes)
    return out, [0.0, 0.26, 0.5, 0.74, 1.0][:frames], keys


@pytest.mark.parametrize("books", [{"pix": 64}, {"sem": 16, "pix": 64}])
def test_video_block_round_trips_and_grid_cells_follow_the_skips(tok, books):
    vocab = Vocab(len(tok), books, max_grid=8, video_times=8, video_time_step=0.25)
    plain = Vocab(len(tok), books, max_grid=8)
    # video ids come after every code range: switching video on moves no existing id
    assert vocab.ranges == plain.ranges and vocab.size == plain.size + 8 + 8
    grids, times, keys = _merged_video(np.random.default_rng(4), books)
    ids = vocab.video_block(grids["pix"], times, keys, sem=grids.get("sem"))
    back = vocab.parse_video_block(ids + [7, 7])
    assert back["length"] == len(ids) and (back["h"], back["w"]) == (4, 6)
    assert all(np.array_equal(back[k], grids[k]) for k in grids)
    assert back["keyframes"].tolist() == keys and back["times"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    full = {k: np.where(g < 0, 0, g) for k, g in grids.items()}
    unmerged = vocab.video_block(full["pix"], times, [True] * 5, sem=full.get("sem"))
    assert len(ids) < len(unmerged)  # merged cells cost nothing, a merged run one <skip_n>

    # every pixel code sits in its (row, col) cell although skips jump over merged cells
    pos = vocab.grid_position_ids(torch.tensor([ids]))[0]
    a, b = vocab.code_range("pix")
    got = [int(p) for p, x in zip(pos, ids) if a <= x < b]
    G = vocab.config.max_grid
    want = [1 + G * G + r * G + c for t in range(5) for r in range(4) for c in range(6) if grids["pix"][t, r, c] >= 0]
    assert got == want
    window = torch.tensor([ids])
    assert torch.equal(vocab.grid_position_ids_tail(window, 40), pos[None, -40:])

    bad = list(ids)
    first_skip = next(i for i, x in enumerate(bad) if vocab.skip_start <= x < vocab.time_start)
    bad[first_skip] = vocab["<skip_8>"]  # jumps past the row end
    with pytest.raises(ValueError, match="past the row end|malformed"):
        vocab.parse_video_block(bad)
    with pytest.raises(MMGenError, match="time"):
        vocab.video_block(grids["pix"], [0, 1, 2, 3, 4.5], keys, sem=grids.get("sem"))
    with pytest.raises(MMGenError, match="first video frame"):
        vocab.video_block(grids["pix"], times, [False] + keys[1:], sem=grids.get("sem"))
    with pytest.raises(MMGenError, match="no video layout"):
        plain.video_block(grids["pix"], times, keys)


def test_build_sequence_writes_video_blocks_or_counts_why_not(tok):
    vocab = Vocab(len(tok), {"pix": 64}, max_grid=8, video_times=8, video_time_step=0.25)
    grids, times, keys = _merged_video(np.random.default_rng(5), {"pix": 64})
    frames = np.stack([times, keys], axis=1)
    doc = Doc(
        items=[
            Text("a red circle moves."),
            Video(path="<codes:1>", format="mp4"),
            Video(path="<codes:2>", format="mp4"),
            Video(path="<codes:3>", format="mp4"),
        ]
    )
    long = np.stack([np.asarray(times) * 10, keys], axis=1)  # 10 s: past the last time token
    cd = CodedDoc(doc, codes={1: grids["pix"], 3: grids["pix"]}, frames={1: frames, 3: long})
    seq = build_sequence(cd, tok, vocab)
    assert seq["skipped"] == {"video_without_codes": 1, "video_codes_not_in_vocab": 1}
    ids = list(seq["input_ids"])
    start = seq["boundaries"][1]
    parsed = vocab.parse_video_block(ids[start:])
    assert np.array_equal(parsed["pix"], grids["pix"]) and start + parsed["length"] == len(ids) - 1
    # video codes are image codes of the same tokenizer: they are "image" loss targets
    only_image = build_sequence(cd, tok, vocab, targets=("image",))["loss_mask"]
    a, b = vocab.code_range("pix")
    assert np.array_equal(only_image, (seq["input_ids"] >= a) & (seq["input_ids"] < b))
    assert only_image.sum() == (grids["pix"] >= 0).sum()
