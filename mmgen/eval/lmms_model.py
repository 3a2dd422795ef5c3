"""An mmgen checkpoint as an lmms-eval model (``lmms-eval --model mmgen --model_args pretrained=DIR``).

- ``generate_until``: with pictures, the question is asked about them in the layout the checkpoint
  learnt (greedy short answer, cut at the request's ``until`` strings); without pictures the model
  continues the text and may draw (``mode=auto``), or draws one picture (``mode=t2i``, or a request's
  ``mode: t2i`` generation kwarg). A request that drew pictures returns, as lmms-eval's unified-model
  wrappers do, ``json.dumps({"text": ..., "images": [PNG paths]})`` with the PNGs under ``output_dir``.
- ``loglikelihood``: the summed log-probability of the continuation's tokens after the context
  (pictures first), and whether greedy decoding would have produced it.
- ``generate_until_multi_round``: lmms-eval's protocol: round 0 answers the request's context, then the
  task's ``doc_to_text(doc, previous_output=..., round_idx=k, previous_round_info=...)`` returns the next
  round's visuals and context until it signals the end; the result is one output per round.

Sampling follows the checkpoint's generation_config.json (else the quick start's settings), overridden
by ``temperature``, ``top_k``, ``top_p``, ``cfg_scale`` and ``seed`` model args.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.utils.compat import ensure_torchvision

ensure_torchvision()  # before lmms-eval and transformers import torchvision next to the CPU torch

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from tqdm import tqdm  # noqa: E402


def _visual_images(visuals) -> list:
    from PIL import Image

    out = []
    for v in visuals or []:
        if isinstance(v, Image.Image):
            out.append(v.convert("RGB"))
        elif isinstance(v, (str, Path)) and Path(v).is_file():
            with Image.open(v) as im:
                out.append(im.convert("RGB"))
    return out


def _cut(text: str, until) -> str:
    for stop in [until] if isinstance(until, str) else list(until or []):
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


class MMGenLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        batch_size: int | str = 1,
        mode: str = "auto",
        output_dir: str = "lmms_eval_images",
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        max_new_tokens: int = 256,
        **kwargs,
    ) -> None:
        super().__init__()
        from mmgen.errors import MMGenError
        from mmgen.eval.provenance import sampling_settings
        from mmgen.models.bundle import load_bundle

        if mode not in ("auto", "t2i", "text"):
            raise MMGenError(f"mode must be auto, t2i or text, got {mode!r}")
        self.bundle = load_bundle(pretrained, device=device)
        self.sampling = sampling_settings(
            pretrained,
            temperature=None if temperature is None else float(temperature),
            top_k=None if top_k is None else int(top_k),
            top_p=None if top_p is None else float(top_p),
            cfg_scale=None if cfg_scale is None else float(cfg_scale),
            seed=None if seed is None else int(seed),
        )
        self.mode, self.max_new_tokens = mode, int(max_new_tokens)
        self.output_dir = Path(output_dir)
        self.batch_size_per_gpu = int(batch_size)
        self._device = torch.device(device)

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    # -- one answer ----------------------------------------------------------------------------------
    def _answer(self, context: str, images: list, gen_kwargs: dict, name: str) -> str:
        from mmgen.inference.batch_generation import generate_images, generate_text_rows
        from mmgen.inference.generate import generate_interleaved, image_ids, picture_prompt_ids

        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until")
        mode = gen_kwargs.get("mode", self.mode)
        s = self.sampling
        if images:  # a question about the pictures (the last one is the picture asked about)
            blocks = image_ids(self.bundle, images)
            row = picture_prompt_ids(self.bundle, context, [t for b in blocks for t in b], question=True)
            n = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            return _cut(generate_text_rows(self.bundle, [row], max_new_tokens=n, batch_size=1)[0], until).strip()
        if mode == "t2i":
            from mmgen.inference.detokenize import image_decoder
            from mmgen.inference.pipeline import GenerationOptions

            # drawn as generate_interleaved below draws: by the bundle's detokenizer when it has one
            img = generate_images(
                self.bundle,
                [context],
                temperature=s["temperature"],
                top_k=s["top_k"],
                top_p=s["top_p"],
                seed=s["seed"],
                cfg_scale=s["cfg_scale"],
                batch_size=1,
                image_decoder=image_decoder(self.bundle, GenerationOptions(seed=s["seed"])),
            )[0]
            return json.dumps({"text": "", "images": [self._save(img, name, 0)]}, ensure_ascii=False)
        doc = generate_interleaved(
            self.bundle,
            context,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            seed=s["seed"],
            cfg_scale=s["cfg_scale"],
            mode="text" if mode == "text" else "auto",
        )
        text = _cut("".join(it.text for it in doc.items if it.kind == "text"), until).strip()
        pics = [it.to_pil() for it in doc.items if it.kind == "image"]
        if not pics:
            return text
        return json.dumps(
            {"text": text, "images": [self._save(p, name, i) for i, p in enumerate(pics)]}, ensure_ascii=False
        )

    def _save(self, img, name: str, i: int) -> str:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        p = self.output_dir / f"{name}_{i}.png"
        img.save(p)
        return str(p)

    # -- lmms-eval's three request types -------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for req in tqdm(requests, desc="mmgen", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            images = _visual_images(doc_to_visual(self.task_dict[task][split][doc_id]))
            out.append(self._answer(context, images, gen_kwargs, f"{task}_{doc_id}"))
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from mmgen.inference.generate import image_ids, picture_prompt_ids, prompt_ids
        from mmgen.processing.sequence import encode_text

        out = []
        for req in tqdm(requests, desc="mmgen loglikelihood", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            images = _visual_images(doc_to_visual(doc)) if doc_to_visual else []
            if images:
                blocks = image_ids(self.bundle, images)
                ctx = picture_prompt_ids(self.bundle, context, [t for b in blocks for t in b], question=True)
            else:
                ctx = prompt_ids(self.bundle, context, image=False)
            cont = encode_text(str(continuation), self.bundle.text_tokenizer)
            ids = torch.tensor([ctx + cont], device=self._device)
            logits = self.bundle.model(input_ids=ids).logits[0, len(ctx) - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(cont, device=self._device)
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list:
        out = []
        for req in tqdm(requests, desc="mmgen multi-round", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc)
            rounds: list[str] = []
            info = None
            for k in range(64):  # lmms-eval's tasks end a dialogue in a few rounds; the bound stops a runaway one
                if k > 0:
                    visuals, context, terminal, _, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=k, previous_round_info=info
                    )
                    if terminal:
                        break
                rounds.append(self._answer(context, _visual_images(visuals), gen_kwargs, f"{task}_{doc_id}_r{k}"))
            out.append(tuple(rounds))
        return out
