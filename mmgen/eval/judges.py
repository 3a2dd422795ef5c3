"""Model judges for InterleavedEval's five aspects on real data, and their agreement with the exact
ShapesWorld rules.

InterleavedEval asks GPT-4o to rate each aspect; mmgen's judges ask any vision-language model one
question per aspect and read a yes/no verdict, so their verdicts can be set against the exact rules of
:mod:`mmgen.eval.interleaved` on ShapesWorld. The questions are plain text files a user edits
(``eval/judge_prompts/<aspect>.txt``; ``{instruction}`` is filled in); the pictures go with them, the
one before the step first, the generated one second.

- :class:`EndpointJudge`: an OpenAI-compatible chat-completions endpoint given by URL (GPT-4o as
  InterleavedEval uses it, or a local server such as vLLM), pictures as base64 PNG data URLs;
- :class:`LocalJudge`: any image-text-to-text model of transformers loaded from a local directory
  (``AutoModelForImageTextToText`` with its processor and chat template), greedy decoding.
"""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.eval.interleaved import ASPECTS
from mmgen.paths import REPO_ROOT

PROMPTS_DIR = REPO_ROOT / "eval" / "judge_prompts"
# Pictures each aspect shows the judge: the scene before the step, the generated picture, or both.
_PICTURES = {
    "text_quality": ("before",),
    "perceptual_quality": ("generated",),
    "image_coherence": ("before", "generated"),
    "text_image_coherence": ("before", "generated"),
    "helpfulness": ("before", "generated"),
}


def load_prompts(folder: str | Path | None = None) -> dict[str, str]:
    d = Path(folder) if folder else PROMPTS_DIR
    missing = [a for a in ASPECTS if not (d / f"{a}.txt").is_file()]
    if missing:
        raise MMGenError(f"judge prompt folder {d} lacks {', '.join(f'{a}.txt' for a in missing)}")
    return {a: (d / f"{a}.txt").read_text() for a in ASPECTS}


def parse_verdict(text: str) -> bool | None:
    """``verdict: yes`` / ``verdict: no`` (else a leading yes / no); None when the reply says neither."""
    t = text.strip().lower()
    m = re.search(r"verdict\s*[:=]\s*(yes|no)\b", t) or re.match(r"\W*(yes|no)\b", t)
    return None if m is None else m.group(1) == "yes"


def _png_data_url(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class _Judge:
    def __init__(self, prompts_dir: str | Path | None = None):
        self.prompts = load_prompts(prompts_dir)

    def ask(self, question: str, images: Sequence) -> str:  # pragma: no cover - each judge implements it
        raise NotImplementedError

    def judge(self, aspect: str, instruction: str, before, generated) -> dict:
        if aspect not in ASPECTS:
            raise MMGenError(f"unknown aspect {aspect!r} (use one of {', '.join(ASPECTS)})")
        pics = {"before": before, "generated": generated}
        reply = self.ask(
            self.prompts[aspect].replace("{instruction}", instruction), [pics[p] for p in _PICTURES[aspect]]
        )
        return {"pass": parse_verdict(reply), "reply": reply}


class EndpointJudge(_Judge):
    """An OpenAI-compatible endpoint: ``url`` is its base (``http://host:port/v1``); ``api_key`` is
    sent as a bearer token when given."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = 16,
        prompts_dir: str | Path | None = None,
    ):
        super().__init__(prompts_dir)
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout, self.max_tokens = model, api_key, timeout, max_tokens

    def ask(self, question: str, images: Sequence) -> str:
        content = [{"type": "text", "text": question}] + [
            {"type": "image_url", "image_url": {"url": _png_data_url(im)}} for im in images
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read())
        except (urllib.error.URLError, TimeoutError) as e:
            raise MMGenError(f"judge endpoint {self.url} failed: {getattr(e, 'reason', e)}") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise MMGenError(f"judge endpoint {self.url} answered no chat completion: {str(reply)[:200]}") from None


class LocalJudge(_Judge):
    """A vision-language model of transformers from a local directory (its processor's chat template
    lays out the question and the pictures)."""

    def __init__(
        self, path: str | Path, device: str = "cpu", max_new_tokens: int = 8, prompts_dir: str | Path | None = None
    ):
        super().__init__(prompts_dir)
        from mmgen.utils.compat import ensure_torchvision

        ensure_torchvision()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = Path(path)
        if not p.is_dir():
            raise MMGenError(f"judge model not found: {p} (give a local directory saved with save_pretrained)")
        self.processor = AutoProcessor.from_pretrained(p)
        self.model = AutoModelForImageTextToText.from_pretrained(p).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def ask(self, question: str, images: Sequence) -> str:
        import torch

        content = [{"type": "image", "image": im.convert("RGB")} for im in images] + [
            {"type": "text", "text": question}
        ]
        inputs = self.processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def agreement(run_dir: str | Path, judge: _Judge, limit: int | None = None, progress: bool = True) -> dict:
    """A judge's verdicts on the interleaved samples of an ``mmgen eval run`` folder against the exact
    ones, per aspect: the share that agree (Wilson interval), Cohen's kappa, and the replies it could
    not read. Written to ``run_dir/judge_agreement.json``."""
    from PIL import Image

    from mmgen.eval.stats import proportion

    run_dir = Path(run_dir)
    store = run_dir / "samples" / "interleaved.jsonl"
    if not store.is_file():
        raise MMGenError(f"{store} not found: run `mmgen eval run CKPT --suite interleaved --out {run_dir}` first")
    records = [r for line in store.read_text().splitlines() for r in json.loads(line)["records"]][:limit]
    pairs: dict[str, list[tuple[bool, bool | None]]] = {a: [] for a in ASPECTS}
    it = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="judge", unit="step")
    rows = []
    for r in it:
        with Image.open(run_dir / r["before"]) as b, Image.open(run_dir / r["image"]) as g:
            before, gen = b.convert("RGB"), g.convert("RGB")
        for aspect, exact in r["aspects"].items():
            v = judge.judge(aspect, r["instruction"], before, gen)
            pairs[aspect].append((exact["pass"], v["pass"]))
            rows.append(
                {"id": r["id"], "aspect": aspect, "exact": exact["pass"], "judge": v["pass"], "reply": v["reply"]}
            )
    out = {}
    for aspect, ps in pairs.items():
        if not ps:
            continue
        read = [(e, j) for e, j in ps if j is not None]
        out[aspect] = {
            "agreement": proportion(sum(e == j for e, j in read), len(read)),
            "kappa": cohen_kappa(read),
            "unreadable_replies": len(ps) - len(read),
            "exact_pass_rate": proportion(sum(e for e, _ in ps), len(ps)),
        }
    result = {"judge": type(judge).__name__, "samples": len(records), "aspects": out}
    (run_dir / "judge_agreement.json").write_text(json.dumps(result, indent=1))
    (run_dir / "judge_verdicts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return result


def cohen_kappa(pairs: Sequence[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa of two yes/no raters; None when chance agreement is total (one rater constant)."""
    n = len(pairs)
    if n == 0:
        return None
    po = sum(a == b for a, b in pairs) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return None if pe >= 1 else (po - pe) / (1 - pe)
