"""The README's "Train on your own corpus with another base LM" commands, run as written on a small
OBELICS-style corpus served from 127.0.0.1, with a tiny Llama saved locally as the base LM (tiny step
counts added; the chat app is built, not served)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from corpus_server import serve

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["img1.png", "img2.jpg", "img3.jpg", "cat.jpg", "lena.jpg", "img8.jpg", "img10.jpg", "blip.jpg"]
# Extra arguments per command so that the test runs in seconds (a later key=value or option wins).
TINY = {
    "fetch": ["--per-host-rate", "100", "--timeout", "5"],
    "filter": ["--workers", "1"],
    "train-tokenizer": ["steps=2", "batch_size=4", "eval_images=2", "progress=false"],
    "tokenize": ["--batch-size", "4"],
    "train": [
        "steps=1",
        "log_every=1",
        "save_every=1",
        "progress=false",
        "tensorboard=false",
        "data.seq_len=256",
        "micro_batch=1",
        "--launcher",
        "none",
    ],
}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Train on your own corpus with another base LM", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _corpus(base: str, path: Path) -> None:
    sentences = [
        "The photographs in this article were taken during a long walk through the old part of the city.",
        "We stopped at every corner where the light was good and the street was quiet enough to work.",
        "Some of the pictures show people going about their day, others show the buildings and the weather.",
        "Readers often ask which camera we use, but the most important thing is to look carefully at the scene.",
        "In the next section we explain how the pictures were chosen and why a few of them were left out.",
        "Every image is shown at its original size, and the captions describe what the picture shows.",
    ]
    recs = []
    for k in range(4):
        a, b = PHOTOS[2 * k], PHOTOS[2 * k + 1]
        para = [
            " ".join(sentences[(k + j) % 6] for j in range(3)),
            " ".join(sentences[(k + j + 3) % 6] for j in range(3)),
        ]
        recs.append(
            {
                "texts": [f"Notes from a city walk, part {k + 1}.", None, para[0], None, para[1]],
                "images": [None, f"{base}/img/{a}", None, f"{base}/img/{b}", None],
                "metadata": [None, {"alt_text": a}, None, {"alt_text": b}, None],
                "general_metadata": {"url": f"https://blog.example.org/walk-{k + 1}"},
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def _base_lm(path: Path) -> None:
    """Another base LM: a tiny Llama with its own tokenizer, saved where a hub download would go."""
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()  # transformers' model classes import torchvision (see mmgen.utils.compat)
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmgen.models.text_tokenizer import train_text_tokenizer

    tok = train_text_tokenizer(
        ["a tiny base model for the walkthrough test, trained on nothing at all"] * 4, vocab_size=300
    )
    tok.save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_readme_walkthrough_runs(real_dir, tmp_path, monkeypatch):
    from mmgen.cli import main

    commands = readme_commands()
    assert [c[1] for c in commands] == ["fetch", "filter", "train-tokenizer", "tokenize", "train", "chat"]
    monkeypatch.chdir(tmp_path)
    _base_lm(tmp_path / "base")
    with serve(real_dir) as (base, hits):
        _corpus(base, tmp_path / "corpus.jsonl")
        for cmd in commands[:-1]:
            args = [
                str(tmp_path / "base") if a == "BASE" else a.replace("=BASE", f"={tmp_path / 'base'}") for a in cmd[1:]
            ]
            assert main(args + TINY[cmd[1]]) == 0, cmd
    fetched = json.loads((tmp_path / "fetched/summary.json").read_text())
    assert (fetched["urls"], fetched["fetched"], fetched["failed"]) == (8, 8, 0)
    filtered = json.loads((tmp_path / "filtered/summary.json").read_text())
    assert filtered["kept"] == 4 and filtered["media_not_fetched"] == 0
    codes = json.loads((tmp_path / "codes/summary.json").read_text())
    assert codes["docs_written"] == 4
    # the LM speaks the base model's text vocabulary, and the chat app builds from its checkpoint
    from transformers import AutoTokenizer

    from mmgen.inference.chat_app import build_app

    final = tmp_path / commands[-1][commands[-1].index("--checkpoint") + 1]
    assert len(AutoTokenizer.from_pretrained(final)) == len(AutoTokenizer.from_pretrained(tmp_path / "base"))
    import gradio as gr

    assert any(isinstance(c, gr.Chatbot) for c in build_app(final).blocks.values())
