"""MMGenForCausalLM (Auto classes, vocab extension, code head, projectors, KV-cache generation),
packing equivalence with features, CFG prompt dropout, the SFT chat template and the weighted loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen.data.code_shards import CodedDoc
from mmgen.data.doc import Doc, Image, Text
from mmgen.data.packing import IGNORE_INDEX, causal_lm_loss, pack_sequences, packed_batch
from mmgen.errors import MMGenError
from mmgen.models.text_tokenizer import train_text_tokenizer
from mmgen.processing.sequence import build_chat_sequence, build_sequence, encode_chat_prompt
from mmgen.processing.vocab import Vocab

TEXTS = [
    "a red circle at the top left.",
    "What color is the circle?",
    "red",
    "How many shapes are there?",
    "two",
    "a blue square in the center.",
    "User: Assistant:",
]


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(TEXTS * 20, vocab_size=320)


@pytest.fixture(scope="module")
def vocab(tok):
    return Vocab(len(tok), {"pix": 32}, max_grid=8)


def _img(i: int) -> Image:
    return Image(path=f"<codes:{i}>", format="png")


def _model(vocab, **kw):
    from mmgen.models.unified_build import build_unified_lm

    return build_unified_lm(vocab, hidden=32, layers=2, heads=2, max_len=256, seed=0, **kw).eval()


def test_auto_class_round_trip_safetensors_and_code_head(vocab, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmgen.models.unified import MMGenConfig, MMGenForCausalLM

    model = _model(vocab, code_head=True, image_feature_dim=8)
    assert model.config.vocab_size == vocab.size and model.config.get_vocab() == vocab
    ids = torch.tensor([[2, 5, vocab["<image>"], vocab.code_range("pix")[0] + 3, 7]])
    feats = torch.randn(1, 8)
    with torch.no_grad():
        want = model(input_ids=ids, image_features=feats).logits
    assert want.shape == (1, 5, vocab.size)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MMGenConfig)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert isinstance(back, MMGenForCausalLM) and back.code_head is not None
    with torch.no_grad():
        got = back(input_ids=ids, image_features=feats).logits
    torch.testing.assert_close(got, want)
    # the code head alone decides the code logits: changing it moves them and nothing else
    with torch.no_grad():
        back.code_head.weight.add_(1.0)
        moved = back(input_ids=ids, image_features=feats).logits
    a = vocab.code_range("pix")[0]
    torch.testing.assert_close(moved[..., :a], want[..., :a])
    assert (moved[..., a:] - want[..., a:]).abs().max() > 1e-3


def test_vocab_extension_rows_start_at_the_mean_and_text_rows_are_kept(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: I001

    from mmgen.models.unified_build import wrap_lm  # first: it makes transformers' model imports work next to CPU torch

    torch.manual_seed(0)
    text_lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab.text_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    old = text_lm.get_input_embeddings().weight.detach().clone()
    layers = {k: v.clone() for k, v in text_lm.model.layers.state_dict().items()}
    model = wrap_lm(text_lm, vocab, code_head=True, image_feature_dim=4)
    # wrapping initialises only the new parts: the pretrained decoder layers are untouched
    assert all(torch.equal(v, model.lm.model.layers.state_dict()[k]) for k, v in layers.items())
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape == (vocab.size, 32) and model.get_output_embeddings().weight.shape[0] == vocab.size
    torch.testing.assert_close(emb[: vocab.text_size], old)
    new = emb[vocab.text_size :]
    # mean_resizing samples around the mean of the trained rows: the new rows' mean sits near it
    assert (new.mean(0) - old.mean(0)).norm() < 0.5 * (old - old.mean(0)).norm(dim=1).mean()
    with pytest.raises(MMGenError, match="embedding rows"):
        wrap_lm(text_lm, Vocab(10, {"pix": 4}))


def test_continuous_features_replace_exactly_the_code_positions(vocab):
    model = _model(vocab, image_feature_dim=8, projector_depth=2)
    a = vocab.code_range("pix")[0]
    ids = torch.tensor([[2, 5, vocab["<image>"], a + 1, a + 2, vocab["<eol>"], 9]])
    feats = torch.randn(2, 8)
    emb = model.embed(ids, image_features=feats)
    plain = model.get_input_embeddings()(ids)
    where = model.feature_positions(ids, "image")
    assert where.tolist() == [[False, False, False, True, True, False, False]]
    torch.testing.assert_close(emb[~where], plain[~where])
    torch.testing.assert_close(emb[where], model.image_projector(feats))
    with pytest.raises(MMGenError, match="3 image feature vectors for 2 image positions"):
        model.embed(ids, image_features=torch.randn(3, 8))
    with pytest.raises(MMGenError, match="no audio projector"):
        model.embed(ids, audio_features=torch.randn(1, 4))


def test_stored_code_vectors_feed_the_projector_and_survive_save_load(vocab, tmp_path):
    """Once set, the stored table stands in for explicit features (what generation and evaluation
    rely on: they pass ids only), before and after save/load; cached decoding reads them too."""
    from transformers import AutoModelForCausalLM

    model = _model(vocab, image_feature_dim=8)
    a = vocab.code_range("pix")[0]
    ids = torch.tensor([[2, 5, vocab["<image>"], a + 1, a + 2, vocab["<eol>"], 9]])
    table = torch.randn(32, 8)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.set_code_vectors("image", table)
        explicit = model(input_ids=ids, image_features=table[[1, 2]]).logits
        stored = model(input_ids=ids).logits
    assert not torch.allclose(before, stored, atol=1e-4)  # the stored vectors are really read
    torch.testing.assert_close(stored, explicit)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.code_vectors == ["image"]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, stored)
        prefix = back(input_ids=ids[:, :4], use_cache=True)
        step = back(
            input_ids=ids[:, 4:5],
            past_key_values=prefix.past_key_values,
            use_cache=True,
            position_ids=torch.tensor([[4]]),
        )
    torch.testing.assert_close(step.logits[:, -1], stored[:, 4], atol=1e-5, rtol=1e-4)
    with pytest.raises(MMGenError, match="expects"):
        model.set_code_vectors("image", torch.randn(31, 8))
    with pytest.raises(MMGenError, match="no audio code vectors"):
        model.set_code_vectors("audio", torch.randn(4, 4))


def test_kv_cache_generation_matches_full_forward(vocab, tok):
    """The call pattern of mmgen.inference.generate: prefill with logits_to_keep=1, then one token
    at a time with past_key_values; the last logits equal a full forward's."""
    model = _model(vocab, code_head=True)
    ids = torch.tensor([[2, 5, 6, 7, vocab["<image>"], vocab.size_token("h", 2)]])
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        out = model(
            input_ids=ids[:, :-1],
            attention_mask=torch.ones_like(ids[:, :-1]),
            position_ids=torch.arange(ids.shape[1] - 1)[None],
            use_cache=True,
            logits_to_keep=1,
        )
        assert out.logits.shape[1] == 1
        step = model(
            input_ids=ids[:, -1:],
            attention_mask=torch.ones_like(ids),
            past_key_values=out.past_key_values,
            position_ids=torch.tensor([[ids.shape[1] - 1]]),
            use_cache=True,
            logits_to_keep=1,
        )
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-4)
    # and the ecosystem's generate() runs on it
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_with_features_equals_unpacked(vocab, tok, attn):
    model = _model(vocab, image_feature_dim=8, attn_implementation=attn)
    rng = np.random.default_rng(0)
    book = torch.randn(32, 8)
    seqs = []
    for i in range(3):
        doc = Doc(items=[Text(TEXTS[i]), _img(1)])
        seqs.append(build_sequence(CodedDoc(doc, codes={1: rng.integers(0, 32, size=(2 + i % 2, 3))}), tok, vocab))
    rows, stats = pack_sequences(seqs, 128)
    assert stats.rows == 1 and stats.fill_rate == pytest.approx(sum(len(s["input_ids"]) for s in seqs) / 128)
    a = vocab.code_range("pix")[0]

    def feats(ids):
        return book[ids[(ids >= a) & (ids < a + 32)] - a]

    with torch.no_grad():
        b = packed_batch(rows, [0])
        packed = causal_lm_loss(
            model(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                position_ids=b["position_ids"],
                image_features=feats(b["input_ids"]),
            ).logits,
            b["labels"],
            reduction="sum",
        )
        separate = 0.0
        for s in seqs:
            ids = torch.from_numpy(s["input_ids"])[None]
            labels = torch.where(torch.from_numpy(s["loss_mask"])[None], ids, IGNORE_INDEX)
            separate += causal_lm_loss(model(input_ids=ids, image_features=feats(ids)).logits, labels, reduction="sum")
    assert packed.item() == pytest.approx(separate.item(), rel=1e-4)


def test_prompt_dropout_equals_training_on_the_uncaptioned_document(vocab, tok):
    model = _model(vocab)
    rng = np.random.default_rng(1)
    cd = CodedDoc(Doc(items=[Text(TEXTS[0]), _img(1)]), codes={1: rng.integers(0, 32, size=(2, 3))})
    seq = build_sequence(cd, tok, vocab)
    assert seq["cond_span"] == (1, seq["boundaries"][1])
    other = build_sequence(
        CodedDoc(Doc(items=[_img(0), Text(TEXTS[5])]), codes={0: rng.integers(0, 32, size=(2, 2))}), tok, vocab
    )
    assert other["cond_span"] is None  # image first: nothing to drop
    rows, _ = pack_sequences([seq, other], 96)
    b = packed_batch(rows, [0], prompt_dropout=0.999999, rng=np.random.default_rng(0))
    assert (b["segment_ids"] < 0).sum() == (rows["segment_ids"] < 0).sum() + seq["cond_span"][1] - seq["cond_span"][0]
    # the same document written without its caption: <s> <image> ... </s>
    a, e = seq["cond_span"]
    bare = np.concatenate([seq["input_ids"][:a], seq["input_ids"][e:]])
    with torch.no_grad():
        dropped = causal_lm_loss(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits,
            b["labels"],
            reduction="sum",
        )
        ids = torch.from_numpy(bare)[None]
        want = causal_lm_loss(
            model(input_ids=ids).logits, ids.clone().index_fill_(1, torch.tensor([0]), IGNORE_INDEX), reduction="sum"
        )
        o = torch.from_numpy(other["input_ids"])[None]
        o_lab = torch.where(torch.from_numpy(other["loss_mask"])[None], o, IGNORE_INDEX)
        want = want + causal_lm_loss(model(input_ids=o).logits, o_lab, reduction="sum")
    assert dropped.item() == pytest.approx(want.item(), rel=1e-4)
    kept = packed_batch(rows, [0], prompt_dropout=1e-9, rng=np.random.default_rng(0))
    assert torch.equal(kept["labels"], torch.from_numpy(rows["labels"][[0]]))


def test_sft_chat_template_targets_only_assistant_turns(vocab, tok):
    rng = np.random.default_rng(2)
    doc = Doc(
        items=[
            _img(0),
            Text(TEXTS[1], {"role": "question"}),
            Text(TEXTS[2], {"role": "answer"}),
            Text(TEXTS[3], {"role": "question"}),
            Text(TEXTS[4], {"role": "answer"}),
            _img(5),
        ]
    )
    codes = {0: rng.integers(0, 32, size=(2, 2)), 5: rng.integers(0, 32, size=(2, 2))}
    seq = build_chat_sequence(CodedDoc(doc, codes=codes), tok, vocab)
    ids, mask = seq["input_ids"], seq["loss_mask"]
    eos = tok.eos_token_id
    targets = ids[mask]
    # exactly the answers (the second one interleaved: text, then an image) and one </s> per answer
    want = [
        *tok.encode(TEXTS[2], add_special_tokens=False),
        eos,
        *tok.encode(TEXTS[4], add_special_tokens=False),
        *vocab.image_block(codes[5]),
        eos,
    ]
    assert targets.tolist() == want
    # the question's image and text, and the role tags, are never targets
    user_image = vocab.image_block(codes[0])
    start = list(ids).index(vocab["<image>"])
    assert list(ids[start : start + len(user_image)]) == user_image and not mask[start : start + len(user_image)].any()
    # inference prompt = the trained prefix up to the first answer
    prompt = encode_chat_prompt(TEXTS[1], tok, image_ids=user_image)
    assert list(ids[: len(prompt)]) == prompt and mask[len(prompt)]
    # no roles at all: an instruction (first item the user's, the rest the answer)
    cap = build_chat_sequence(CodedDoc(Doc(items=[Text(TEXTS[0]), _img(1)]), codes={1: codes[0]}), tok, vocab)
    assert cap["input_ids"][cap["loss_mask"]].tolist() == [*vocab.image_block(codes[0]), eos]


def test_pretraining_can_take_role_documents_in_the_chat_template(vocab, tok):
    """data.chat=roles: a QA document (items with roles) is built exactly as SFT builds it, a caption
    document stays in the pretraining layout; all and none treat both alike. Counts add up."""
    from mmgen.processing.sequence import build_sequences

    rng = np.random.default_rng(3)
    qa = CodedDoc(
        Doc(items=[_img(0), Text(TEXTS[1], {"role": "question"}), Text(TEXTS[2], {"role": "answer"})]),
        codes={0: rng.integers(0, 32, size=(2, 2))},
    )
    cap = CodedDoc(Doc(items=[Text(TEXTS[0]), _img(1)]), codes={1: rng.integers(0, 32, size=(2, 2))})
    chat_qa, chat_cap = (build_chat_sequence(d, tok, vocab)["input_ids"].tolist() for d in (qa, cap))
    plain_qa, plain_cap = (build_sequence(d, tok, vocab)["input_ids"].tolist() for d in (qa, cap))
    assert chat_qa != plain_qa and chat_cap != plain_cap
    for mode, want in [("roles", [chat_qa, plain_cap]), ("all", [chat_qa, chat_cap]), ("none", [plain_qa, plain_cap])]:
        seqs, stats = build_sequences([qa, cap], tok, vocab, chat=mode)
        assert [s["input_ids"].tolist() for s in seqs] == want, mode
        assert stats.docs_in == stats.sequences == 2
    # pretraining on a conversation: the user's picture and question are targets too, the role tags not
    seqs, _ = build_sequences([qa], tok, vocab, chat="roles", user_targets=True)
    ids, mask = seqs[0]["input_ids"], seqs[0]["loss_mask"]
    tags = [*tok.encode("User:", add_special_tokens=False), *tok.encode("Assistant:", add_special_tokens=False)]
    assert ids.tolist() == chat_qa and not mask[0]
    assert [x for x, m in zip(ids.tolist()[1:], mask[1:]) if not m] == tags


def test_weighted_loss_and_z_loss(vocab):
    from mmgen.training.losses import lm_loss, modality_weights

    torch.manual_seed(0)
    a = vocab.code_range("pix")[0]
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, a + 1, a + 2, vocab["<eol>"]]])
    logits = torch.randn(1, 6, vocab.size)
    w1 = modality_weights(vocab, {})
    base, stats = lm_loss(logits, labels, vocab, w1, denominator=5)
    plain = causal_lm_loss(logits, labels)
    torch.testing.assert_close(base, plain)
    assert {k: n for k, (_, n) in stats.items()} == {0: 2, 1: 1, 2: 2}
    no_img, _ = lm_loss(logits, labels, vocab, modality_weights(vocab, {"image": 0.0}), denominator=5)
    # <eol> is structural, not image: only the two pix targets vanish
    rest = causal_lm_loss(logits, labels.masked_fill(labels >= a, IGNORE_INDEX), reduction="sum") / 5
    torch.testing.assert_close(no_img, rest)
    assert rest < base
    z, _ = lm_loss(logits, labels, vocab, w1, denominator=5, z_loss=1e-2)
    lse = torch.logsumexp(logits[:, :-1], -1)[labels[:, 1:] != IGNORE_INDEX]
    torch.testing.assert_close(z - base, 1e-2 * lse.pow(2).sum() / 5)
    with pytest.raises(MMGenError, match="unknown modality"):
        modality_weights(vocab, {"imgae": 1.0})


def test_gradient_checkpointing_gives_the_same_gradients(vocab):
    ids = torch.tensor([[2, 5, 6, vocab["<image>"], vocab.code_range("pix")[0] + 1, 7, 3]])
    grads = []
    for ckpt in (False, True):
        model = _model(vocab, code_head=True).train()
        if ckpt:
            from mmgen.training.model_setup import enable_activation_checkpointing

            enable_activation_checkpointing(model)
            assert model.lm.model.gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)
