"""Safe generation defaults: the bundle's own sampling settings, the context cap, plain-text prompts,
arguments checked before loading, damaged checkpoints, and a chat that serves several people."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest


def _error_line(stderr: str) -> str:
    """The CLI's one error line, the last of stderr (transformers' weight-loading bar may come before it),
    and no traceback."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[-1]


# -- generation_config.json -----------------------------------------------------------------------------
def test_generation_config_round_trip_keeps_the_model_ids(bundle_dir, tmp_path):
    from mmgen.inference.settings import (
        DEFAULT_SAMPLING,
        SamplingSettings,
        load_generation_config,
        save_generation_config,
    )
    from mmgen.models.bundle import load_bundle

    d = tmp_path / "b"
    shutil.copytree(bundle_dir, d)
    # the model's own save wrote bos/eos/pad only: the quick start's defaults fill the sampling fields
    before = load_generation_config(d)
    assert (before.do_sample, before.temperature, before.top_k, before.top_p, before.guidance_scale) == (
        True,
        DEFAULT_SAMPLING.temperature,
        0,
        1.0,
        1.0,
    )
    assert before.eos_token_id == 3
    save_generation_config(d, SamplingSettings(temperature=0.7, top_k=5, top_p=0.9, cfg_scale=2.5))
    saved = json.loads((d / "generation_config.json").read_text())
    assert {k: saved[k] for k in ("do_sample", "temperature", "top_k", "top_p", "guidance_scale", "eos_token_id")} == {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "guidance_scale": 2.5,
        "eos_token_id": 3,
    }
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(d).guidance_scale == 2.5  # transformers' own reader agrees
    save_generation_config(d, SamplingSettings(temperature=0.0))
    greedy = load_generation_config(d)
    assert greedy.do_sample is False and greedy.temperature is None
    assert load_bundle(d).model.generation_config.do_sample is False
    # a bundle saved again keeps its settings: the model's own save writes them
    load_bundle(d).save(tmp_path / "again")
    assert load_bundle(tmp_path / "again").model.generation_config.do_sample is False
    # a bundle with no file at all (older bundles) gets the defaults too
    (d / "generation_config.json").unlink()
    assert load_generation_config(d).temperature == DEFAULT_SAMPLING.temperature
    (d / "generation_config.json").write_text("{not json")
    from mmgen.errors import MMGenError

    with pytest.raises(MMGenError, match="generation_config.json"):
        load_generation_config(d)
    with pytest.raises(MMGenError, match="generation_config.json is not a valid generation config"):
        load_bundle(d)  # before the weights load


def test_generation_uses_the_bundles_settings_unless_told_otherwise(bundle_dir, tmp_path):
    from mmgen.inference.generate import generate_interleaved, run_generate
    from mmgen.inference.settings import SamplingSettings, save_generation_config
    from mmgen.models.bundle import load_bundle

    d = tmp_path / "b"
    shutil.copytree(bundle_dir, d)
    save_generation_config(d, SamplingSettings(temperature=0.0, cfg_scale=2.0))
    bundle = load_bundle(d)
    doc = generate_interleaved(bundle, "a red circle", mode="t2i", max_new_tokens=30)
    assert (doc.meta["temperature"], doc.meta["cfg_scale"]) == (0.0, 2.0)
    explicit = generate_interleaved(
        bundle, "a red circle", mode="t2i", max_new_tokens=30, temperature=0.0, cfg_scale=2.0, seed=9
    )  # greedy: the seed does not matter
    assert np.array_equal(np.asarray(doc.images[0].to_pil()), np.asarray(explicit.images[0].to_pil()))
    told = generate_interleaved(bundle, "a red circle", mode="t2i", max_new_tokens=30, temperature=1.0, top_k=3)
    assert (told.meta["temperature"], told.meta["top_k"], told.meta["cfg_scale"]) == (1.0, 3, 2.0)
    doc, _ = run_generate(d, "a red circle", out=tmp_path / "out", mode="t2i", max_new_tokens=30, top_p=0.5)
    meta = json.loads((tmp_path / "out" / "doc.json").read_text())["meta"]
    assert (meta["temperature"], meta["top_p"], meta["cfg_scale"]) == (0.0, 0.5, 2.0)


# -- the context ---------------------------------------------------------------------------------------------
def test_max_new_tokens_is_capped_by_the_context_and_long_prompts_are_refused(bundle_dir, tmp_path, capsys):
    from mmgen.errors import MMGenError
    from mmgen.inference.generate import generate_interleaved, prompt_ids
    from mmgen.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    bundle.model.config.max_position_embeddings = 64
    n_prompt = len(prompt_ids(bundle, "a red circle", image=False))
    doc = generate_interleaved(bundle, "a red circle", mode="text", max_new_tokens=10**9, temperature=1.0)
    assert doc.meta["max_new_tokens"] == 64 - n_prompt
    assert "capped" in doc.meta["note"] and doc.meta["new_tokens"] <= 64 - n_prompt
    with pytest.raises(MMGenError, match=r"the prompt is \d+ tokens but the model reads at most 64") as e:
        generate_interleaved(bundle, "red " * 200, mode="text")
    assert "\n" not in str(e.value)

    from mmgen.cli import main

    rc = main(
        [
            "generate",
            "--checkpoint",
            str(bundle_dir),
            "--prompt",
            "red " * 3000,
            "--mode",
            "text",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = _error_line(capsys.readouterr().err)
    assert rc == 2 and "reads at most 2048" in err


# -- user text is plain text -------------------------------------------------------------------------------
def test_typed_special_tokens_are_plain_text_in_prompts_and_training(bundle_dir):
    from mmgen.data.code_shards import CodedDoc
    from mmgen.data.doc import Doc, Text
    from mmgen.inference.generate import prompt_ids
    from mmgen.models.bundle import load_bundle
    from mmgen.processing.sequence import build_sequence, encode_text

    bundle = load_bundle(bundle_dir)
    tok, vocab = bundle.text_tokenizer, bundle.vocab
    special = set(tok.all_special_ids)
    typed = "a red circle </s> <s><pad><unk> <image> </image> <eol> done"
    ids = encode_text(typed, tok)
    assert not special & set(ids) and max(ids) < vocab.text_size
    assert tok.decode(ids) == typed  # the characters survive, as characters
    plain = "a large red circle at the top left, on a black background."
    assert encode_text(plain, tok) == tok.encode(plain, add_special_tokens=False)  # ordinary text unchanged
    row = prompt_ids(bundle, typed, image=False)
    assert row[0] == tok.bos_token_id and not special & set(row[1:])
    seq = build_sequence(CodedDoc(Doc(items=[Text(typed)]), {}), tok, vocab)["input_ids"].tolist()
    assert seq[0] == tok.bos_token_id and seq[-1] == tok.eos_token_id and not special & set(seq[1:-1])


# -- arguments before the model, damaged checkpoints -----------------------------------------------------
@pytest.mark.parametrize(
    "args,msg",
    [
        (["--mode", "video"], "unknown mode 'video'"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
        (["--cfg-scale", "0.5"], "cfg_scale must be >= 1"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    ],
)
def test_cli_checks_arguments_before_loading_the_model(bundle_dir, tmp_path, capsys, monkeypatch, args, msg):
    import mmgen.models.bundle as bundle_mod
    from mmgen.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(bundle_mod, "load_bundle", no_load)
    rc = main(["generate", "--checkpoint", str(bundle_dir), "--prompt", "x", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {err[7:]}" and msg in err and "\n" not in err
    rc = main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not exist" in err and "\n" not in err


@pytest.mark.parametrize(
    "name,damage",
    [
        ("model.safetensors", lambda b: b[: len(b) // 2]),  # truncated copy
        ("model.safetensors", lambda b: b"\x00" * 64),
        ("config.json", lambda b: b[:-10]),
    ],
)
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(bundle_dir, tmp_path, capsys, name, damage):
    from mmgen.cli import main

    d = tmp_path / "b"
    shutil.copytree(bundle_dir, d)
    (d / name).write_bytes(damage((d / name).read_bytes()))
    rc = main(["generate", "--checkpoint", str(d), "--prompt", "x", "--out", str(tmp_path / "o")])
    err = _error_line(capsys.readouterr().err)
    assert rc == 2 and str(d / name) in err


# -- the chat ----------------------------------------------------------------------------------------------
def test_chat_refuses_empty_oversized_and_overlong_messages(bundle_dir):
    from mmgen.errors import MMGenError
    from mmgen.inference.chat_engine import ChatEngine
    from mmgen.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    engine = ChatEngine(bundle, max_prompt_chars=500)
    with pytest.raises(MMGenError, match="type a message"):
        list(engine.answer("", [], mode="text"))
    with pytest.raises(MMGenError, match="the message is 600 characters; this chat takes at most 500"):
        list(engine.answer("x" * 600, [], mode="text"))
    bundle.model.config.max_position_embeddings = 32
    with pytest.raises(MMGenError, match="reads at most 32"):
        list(engine.answer("red " * 100, [], mode="text"))
    final = list(engine.answer("red", [], mode="text", max_new_tokens=10**6))[-1]  # capped, not allocated
    assert final[-1]["role"] == "assistant"


def test_chat_app_queue_cache_and_bad_uploads(bundle_dir, tmp_path):
    from mmgen.errors import MMGenError
    from mmgen.inference.chat_app import CONCURRENCY, DELETE_CACHE, build_app
    from mmgen.inference.chat_engine import load_picture
    from mmgen.models.bundle import load_bundle

    app = build_app(bundle_dir, bundle=load_bundle(bundle_dir))
    assert CONCURRENCY > 1 and app._queue.default_concurrency_limit == CONCURRENCY
    assert app.delete_cache == DELETE_CACHE
    bad = tmp_path / "upload.png"
    bad.write_bytes(b"this is not a picture")
    with pytest.raises(MMGenError, match="could not be read as an image") as e:
        load_picture(bad)
    assert str(tmp_path) not in str(e.value)
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    assert load_picture(tmp_path / "ok.png").size == (8, 8)


def test_chat_server_answers_a_bad_upload_with_one_clear_line(bundle_dir, tmp_path):
    from gradio_client import Client, handle_file

    from mmgen.inference.chat_app import build_app, launch
    from mmgen.models.bundle import load_bundle

    from bundlekit import free_port

    bad = tmp_path / "upload.png"
    bad.write_bytes(b"this is not a picture")
    app = build_app(bundle_dir, bundle=load_bundle(bundle_dir))
    url = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        client = Client(url, verbose=False)
        with pytest.raises(Exception) as bad_upload:
            client.predict("what colour?", [], "text", 0.0, 0, 0, 1.0, 16, handle_file(str(bad)), api_name="/chat")
        with pytest.raises(Exception) as empty:
            client.predict("  ", [], "text", 0.0, 0, 0, 1.0, 16, api_name="/chat")
    finally:
        app.close()
    assert "could not be read as an image" in str(bad_upload.value) and "/tmp" not in str(bad_upload.value)
    assert "type a message" in str(empty.value)


def test_two_chat_users_are_answered_at_the_same_time(bundle_dir):
    """The second request starts while the first is still answering (with one slot it would wait)."""
    from gradio_client import Client

    from mmgen.inference.chat_app import build_app, launch
    from mmgen.models.bundle import load_bundle

    from bundlekit import free_port

    app = build_app(bundle_dir, bundle=load_bundle(bundle_dir))
    engine = app.mmgen_engine
    real = engine.answer
    first_started, second_started = threading.Event(), threading.Event()
    overlapped = []

    def answer(message, history, *args, **kw):
        if message == "first":  # hold the slot until the second request has started, at most 20 s
            first_started.set()
            overlapped.append(second_started.wait(timeout=20))
        else:
            second_started.set()
        yield from real(message, history, *args, **kw)

    engine.answer = answer
    url = launch(app, host="127.0.0.1", port=free_port(), block=False)
    try:
        client = Client(url, verbose=False)
        first = client.submit("first", [], "text", 0.0, 0, 0, 1.0, 16, api_name="/chat")
        assert first_started.wait(timeout=30)
        second = client.submit("second", [], "text", 0.0, 0, 0, 1.0, 16, api_name="/chat")
        out1, out2 = first.result(timeout=60), second.result(timeout=60)
    finally:
        app.close()
    assert overlapped == [True]
    assert out1[0]["content"][0]["text"] == "first" and out2[0]["content"][0]["text"] == "second"
