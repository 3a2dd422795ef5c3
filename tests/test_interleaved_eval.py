"""InterleavedEval's five aspects by rule on constructed good and bad steps, and the model-judge
interface: an OpenAI-compatible endpoint (a tiny server this test starts on 127.0.0.1) and the
agreement of its verdicts with the exact ones."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mmgen.eval.interleaved import ASPECTS, apply_instruction, judge_step
from mmgen.world import Obj, Scene, render

RED_CIRCLE = Obj("circle", "red", "large", (0, 0))
BLUE_SQUARE = Obj("square", "blue", "small", (1, 1))
BEFORE = Scene("black", [RED_CIRCLE, BLUE_SQUARE])


@pytest.mark.parametrize(
    "text, after",
    [
        (
            "Add a small green cross at the bottom right.",
            [RED_CIRCLE, BLUE_SQUARE, Obj("cross", "green", "small", (2, 2))],
        ),
        ("Remove the red circle.", [BLUE_SQUARE]),
        ("Move the blue square to the top.", [RED_CIRCLE, Obj("square", "blue", "small", (0, 1))]),
        ("Make the red circle yellow.", [Obj("circle", "yellow", "large", (0, 0)), BLUE_SQUARE]),
        ("Make the square in the center large.", [RED_CIRCLE, Obj("square", "blue", "large", (1, 1))]),
    ],
)
def test_the_edit_grammar_applies(text, after):
    assert apply_instruction(BEFORE, text) == Scene("black", after)


@pytest.mark.parametrize(
    "text",
    [
        "Remove the green circle.",
        "Move the blue square to the top left.",
        "Make the red circle red.",
        "Paint everything purple.",
        "Add a red circle at the top left.",
    ],
)
def test_instructions_that_do_not_apply(text):
    assert apply_instruction(BEFORE, text) is None


def _verdicts(text, pred, truth=None, model_text=False):
    return {a: v["pass"] for a, v in judge_step(BEFORE, text, pred, truth, model_text=model_text).items()}


def test_each_aspect_on_good_and_bad_steps():
    text = "Move the blue square to the top."
    truth = apply_instruction(BEFORE, text)
    assert _verdicts(text, truth, truth, model_text=True) == dict.fromkeys(ASPECTS, True)
    # the change made, but an untouched object lost: image coherence and helpfulness fail
    assert _verdicts(text, Scene("black", [Obj("square", "blue", "small", (0, 1))])) == {
        "perceptual_quality": True,
        "image_coherence": False,
        "text_image_coherence": True,
        "helpfulness": False,
    }
    # the scene kept but the change not made: text-image coherence fails
    assert _verdicts(text, BEFORE) == {
        "perceptual_quality": True,
        "image_coherence": True,
        "text_image_coherence": False,
        "helpfulness": False,
    }
    # everything right plus an extra object: only helpfulness fails
    extra = Scene("black", truth.objects + [Obj("cross", "cyan", "small", (2, 0))])
    assert _verdicts(text, extra) == {
        "perceptual_quality": True,
        "image_coherence": True,
        "text_image_coherence": True,
        "helpfulness": False,
    }
    # the background changed: image coherence fails
    assert not _verdicts(text, Scene("white", truth.objects))["image_coherence"]
    # an unreadable picture fails every picture aspect
    assert _verdicts(text, None) == {
        "perceptual_quality": False,
        "image_coherence": False,
        "text_image_coherence": False,
        "helpfulness": False,
    }
    # a model-written instruction outside the grammar fails text quality and leaves nothing to compare
    assert _verdicts("Paint it purple.", BEFORE, model_text=True) == {"text_quality": False, "perceptual_quality": True}


def test_rules_through_the_scene_parser():
    from mmgen.world.scene_parser import parse_scene

    text = "Make the red circle yellow."
    truth = apply_instruction(BEFORE, text)
    assert all(v["pass"] for v in judge_step(BEFORE, text, parse_scene(render(truth, 72, 72))).values())
    assert not judge_step(BEFORE, text, parse_scene(render(BEFORE, 72, 72)))["text_image_coherence"]["pass"]


class _Server:
    """A tiny OpenAI-compatible chat-completions server: answers yes when the request shows the judge
    the pictures its aspect needs, and records what it was sent. Stops by itself after the test."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                content = body["messages"][0]["content"]
                n_images = sum(
                    c["type"] == "image_url" and c["image_url"]["url"].startswith("data:image/png;base64,")
                    for c in content
                )
                text = "verdict: yes" if "image coherence" in content[0]["text"] and n_images == 2 else "verdict: no"
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


def test_endpoint_judge_and_its_agreement_with_the_rules(server, tmp_path):
    from mmgen.eval.judges import EndpointJudge, agreement, cohen_kappa, parse_verdict

    judge = EndpointJudge(server.url, "judge-model", api_key="k")
    v = judge.judge("image_coherence", "Remove the red circle.", render(BEFORE, 48, 48), render(BEFORE, 48, 48))
    assert v == {"pass": True, "reply": "verdict: yes"}
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k" and req["body"]["model"] == "judge-model"
    assert "Remove the red circle." in req["body"]["messages"][0]["content"][0]["text"]
    assert judge.judge("perceptual_quality", "x", render(BEFORE, 48, 48), render(BEFORE, 48, 48))["pass"] is False
    assert len(server.requests[-1]["body"]["messages"][0]["content"]) == 2  # the generated picture alone

    # a run folder with two judged steps: the exact verdicts against the server's
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    recs = []
    for i, pred in enumerate([apply_instruction(BEFORE, "Remove the red circle."), BEFORE]):
        render(BEFORE, 48, 48).save(run / f"b{i}.png")
        render(pred, 48, 48).save(run / f"g{i}.png")
        recs.append(
            {
                "id": str(i),
                "instruction": "Remove the red circle.",
                "before": f"b{i}.png",
                "image": f"g{i}.png",
                "aspects": judge_step(BEFORE, "Remove the red circle.", pred),
            }
        )
    (run / "samples" / "interleaved.jsonl").write_text(json.dumps({"batch": "val/0", "records": recs}) + "\n")
    res = agreement(run, judge, progress=False)
    ic = res["aspects"]["image_coherence"]  # exact: both keep the blue square; the server says yes: 2 of 2
    assert ic["agreement"]["k"] == 2 and ic["agreement"]["n"] == 2 and ic["kappa"] is None
    hp = res["aspects"]["helpfulness"]  # exact: yes, no; the server: no, no
    assert hp["agreement"]["k"] == 1 and hp["kappa"] == 0.0
    assert (run / "judge_agreement.json").is_file() and len(
        (run / "judge_verdicts.jsonl").read_text().splitlines()
    ) == 8
    assert (
        parse_verdict("Verdict: No.") is False
        and parse_verdict("yes, it does") is True
        and parse_verdict("maybe") is None
    )
    assert cohen_kappa([(True, True), (False, False)]) == 1.0


def test_endpoint_errors_are_one_line(tmp_path):
    from mmgen.errors import MMGenError
    from mmgen.eval.judges import EndpointJudge, load_prompts

    s = _Server()
    url = s.url
    s.close()  # nothing listens there any more
    with pytest.raises(MMGenError, match="judge endpoint .* failed"):
        EndpointJudge(url, "m", timeout=2).judge("helpfulness", "x", render(BEFORE, 32, 32), render(BEFORE, 32, 32))
    (tmp_path / "helpfulness.txt").write_text("q")
    with pytest.raises(MMGenError, match="lacks text_quality.txt"):
        load_prompts(tmp_path)


def tiny_vlm(path):
    """A randomly initialised LLaVA (tiny CLIP vision tower, one-layer Llama) with a word-level tokenizer,
    an image processor and a chat template, built from config and saved to ``path``."""
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "verdict:", "yes", "no", "answer:"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}answer:{% "
        "endif %}"
    )
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=3,
        ),
        image_token_id=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_local_judge_with_a_tiny_vlm(tmp_path):
    """The plumbing of a local judge: a random tiny VLM loaded by path through AutoModelForImageTextToText
    answers greedily (the same reply twice) with words of its vocabulary, read as a verdict."""
    from mmgen.eval.judges import LocalJudge, parse_verdict

    judge = LocalJudge(tiny_vlm(tmp_path / "vlm"), max_new_tokens=3)
    a = judge.judge("image_coherence", "Remove the red circle.", render(BEFORE, 40, 40), render(BEFORE, 40, 40))
    b = judge.judge("image_coherence", "Remove the red circle.", render(BEFORE, 40, 40), render(BEFORE, 40, 40))
    assert a == b and a["pass"] == parse_verdict(a["reply"])
    assert set(a["reply"].split()) <= {"<unk>", "verdict:", "yes", "no", "answer:"}
    other = judge.judge("perceptual_quality", "x", render(BEFORE, 40, 40), render(BEFORE, 40, 40))
    assert other["reply"] and set(other["reply"].split()) <= {"<unk>", "verdict:", "yes", "no", "answer:"}


def test_a_continuation_is_scored_by_compare_scenes(monkeypatch, tmp_path):
    """The model removes the last object, then draws a picture the parser cannot read: no object of the
    (empty) truth is credited, as compare_scenes scores an unparsed picture."""
    import numpy as np
    from PIL import Image as PILImage

    import mmgen.inference.batch_generation as gen
    from mmgen.data.doc import Image, Text
    from mmgen.eval.interleaved_suite import InterleavedSuite
    from mmgen.eval.suite_base import Context, EvalOptions

    before = Scene("black", [RED_CIRCLE])
    noise = PILImage.fromarray(np.random.RandomState(0).randint(0, 255, (72, 72, 3), dtype=np.uint8))
    monkeypatch.setattr(gen, "generate_text_rows", lambda *a, **k: ["Remove the red circle. Then more"])
    monkeypatch.setattr(gen, "generate_image_rows", lambda *a, **k: [noise])
    case = {
        "row": [1],
        "uncond": [1],
        "before": before.to_dict(),
        "items": [Text("A scene."), Image.from_pil(render(before, 72, 72), meta={"scene": before.to_dict()})],
    }
    bundle = type("B", (), {"text_tokenizer": None, "vocab": {"<image>": 5}})()
    monkeypatch.setattr("mmgen.processing.sequence.encode_text", lambda t, tok: [7])
    ctx = Context(
        out=tmp_path,
        sampling={"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0, "seed": 0},
        opts=EvalOptions(),
    )
    [rec] = InterleavedSuite().run_batch(bundle, 0, ("continuation_val", 0, [case]), ctx)
    assert rec["instruction"] == "Remove the red circle." and rec["truth"] == Scene("black", []).to_dict()
    assert (rec["parsed"], rec["exact"], rec["object_recall"]) == (False, False, 0.0)
