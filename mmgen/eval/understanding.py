"""Image understanding (visual QA) and interleaved build-up accuracy on ShapesWorld.

Both use the world's own generators, so the truth is exact:

- **QA** (``qa_accuracy``): an image of a held-out-from-training scene and one question about colour,
  shape, count, position, size, background or a relation; the model's greedy answer must equal the
  truth (one word, or a two-word position such as "top left"). A checkpoint trained with SFT is
  asked in its chat layout (``<s> User: [image] question Assistant:``), a pretrained one in the pretraining layout
  (``<s> [image] question``), which is how each saw QA documents in training.
- **Interleaved** (``interleaved_accuracy``): a build-up document up to step ``k``'s instruction
  ("Move the red circle to the top right."), every earlier step's text and image included; the
  model draws the next image, which must keep every unchanged object and apply the change, i.e. the
  parsed scene equals step ``k``'s truth (objects with shape, colour, size and cell; background).
"""

from __future__ import annotations

import random
import re

import numpy as np


def _scenes(n: int, split: str, seed: int, tag: str, **kw) -> tuple[list, random.Random]:
    """``n`` scenes of ``split`` and the generator that drew them (questions are drawn from it next)."""
    from mmgen.data.synthetic import random_scene, split_of

    rng = random.Random(f"{tag}-{split}-{seed}")
    out = []
    while len(out) < n:
        scene = random_scene(rng, split=split, **kw)
        if split_of(scene) == split:
            out.append(scene)
    return out, rng


def normalize_answer(text: str) -> str:
    """The answer phrase ``text`` starts with, lower case, without punctuation: the longest run of
    its first words that is a ShapesWorld answer ("bottom right" before "bottom"), else its first
    word. Whatever the model writes after the answer is ignored."""
    from mmgen.data.synthetic.text import answer_phrases

    words = re.findall(r"[a-z]+", text.lower())
    phrases = answer_phrases()
    for k in (2, 1):
        if len(words) >= k and " ".join(words[:k]) in phrases:
            return " ".join(words[:k])
    return words[0] if words else ""


def qa_prompt_ids(bundle, image_block: list[int], question: str) -> list[int]:
    from mmgen.inference.generate import picture_prompt_ids

    return picture_prompt_ids(bundle, question, image_block, question=True)


def evaluate_qa(bundle, n: int = 64, seed: int = 0, splits=("val", "heldout"), batch_size: int = 16) -> dict:
    """Greedy short answers to one question per scene, scored exactly, per split and per type."""
    from mmgen.data.synthetic import render, render_size
    from mmgen.data.synthetic.text import qa_pairs
    from mmgen.inference.generate import generate_text_rows, image_ids

    res = resolution(bundle)
    result: dict = {"splits": {}, "samples": []}
    for split in splits:
        scenes, rng = _scenes(n, split, seed, "qa")
        qas = [qa_pairs(s, rng, n=1)[0] for s in scenes]
        blocks = image_ids(bundle, [render(s, *render_size(res)) for s in scenes])
        rows = [qa_prompt_ids(bundle, b, q) for b, (q, _, _) in zip(blocks, qas)]
        answers = generate_text_rows(bundle, rows, max_new_tokens=6, batch_size=batch_size, progress=True,
                                     desc=f"qa {split}")
        correct = [normalize_answer(a) == truth for a, (_, truth, _) in zip(answers, qas)]
        by_type: dict[str, list[bool]] = {}
        for ok, (_, _, qtype) in zip(correct, qas):
            by_type.setdefault(qtype, []).append(ok)
        result["splits"][split] = {"n": n, "accuracy": float(np.mean(correct)),
                                   "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())}}
        result["samples"] += [{"split": split, "question": q, "truth": t, "answer": a, "correct": ok}
                              for (q, t, _), a, ok in zip(qas, answers, correct)]
    return result


def resolution(bundle) -> tuple[int, int]:
    v = bundle.meta.get("image_resolution")
    return tuple(v) if v else tuple(bundle.image_tokenizer.resolution)


def buildup_cases(n: int, split: str, seed: int, res) -> list[dict]:
    """``n`` build-up documents cut before a random step's image: the prompt items and the truth scene."""
    from mmgen.data.synthetic import make_doc, render_size

    rng = random.Random(f"buildup-{split}-{seed}")
    cases = []
    while len(cases) < n:
        doc = make_doc("buildup", rng, split=split, size=render_size(res))
        steps = [i for i, it in enumerate(doc.items) if it.kind == "image" and it.meta.get("step", 0) > 0]
        cut = rng.choice(steps)  # the image to draw; the items before it are the prompt
        cases.append({"items": doc.items[:cut], "truth": doc.items[cut].meta["scene"],
                      "instruction": doc.items[cut - 1].text})
    return cases


def continuation_cases(n: int, split: str, seed: int, res) -> list[dict]:
    """``n`` build-up documents cut right after a random step's picture (not the last): the model is to
    write the next instruction and draw its picture. The truth is whatever its own instruction leads to."""
    from mmgen.data.synthetic import make_doc, render_size

    rng = random.Random(f"continuation-{split}-{seed}")
    cases = []
    while len(cases) < n:
        doc = make_doc("buildup", rng, split=split, size=render_size(res))
        images = [i for i, it in enumerate(doc.items) if it.kind == "image"][:-1]
        cut = rng.choice(images) + 1
        cases.append({"items": doc.items[:cut], "before": doc.items[cut - 1].meta["scene"]})
    return cases


def buildup_prompt_ids(bundle, items) -> list[int]:
    """A build-up document up to an instruction, then ``<image>``, in the layout the bundle learnt it:
    pretraining's (consecutive texts joined by a space, images as blocks of their own codes, what
    :func:`build_sequence` writes) or, after SFT, the chat template's (the first item is the user's
    turn, the rest the assistant's answer, each item on its own, as :func:`build_chat_sequence` writes)."""
    from mmgen.data.sequence import ASSISTANT_TAG, USER_TAG, encode_prompt, encode_text
    from mmgen.inference.generate import image_ids, trained_in_chat

    tok = bundle.text_tokenizer
    ids = encode_prompt("", tok, bundle.vocab, image=False)
    if trained_in_chat(bundle):
        pieces = [encode_text(it.text, tok) if it.kind == "text" else image_ids(bundle, [it.to_pil()])[0] for it in items]
        ids += encode_text(USER_TAG, tok) + pieces[0] + encode_text(ASSISTANT_TAG, tok)
        return ids + [t for p in pieces[1:] for t in p] + [bundle.vocab["<image>"]]
    texts: list[str] = []
    for it in items:
        if it.kind == "text":
            texts.append(it.text)
            continue
        if texts:
            ids += encode_text(" ".join(texts), tok)
            texts = []
        ids += image_ids(bundle, [it.to_pil()])[0]
    if texts:
        ids += encode_text(" ".join(texts), tok)
    return ids + [bundle.vocab["<image>"]]


def evaluate_interleaved(bundle, n: int = 32, seed: int = 0, splits=("val",), temperature: float | None = None,
                         top_k: int | None = None, cfg_scale: float | None = None, batch_size: int = 16) -> dict:
    """Next-image accuracy on build-up documents, judged by the scene parser. Sampling options left
    None are the bundle's (its ``generation_config.json``)."""
    from mmgen.data.synthetic.scene import Scene
    from mmgen.eval.scene_parser import compare_scenes, parse_scene
    from mmgen.inference.generate import generate_image_rows, prompt_ids

    res = resolution(bundle)
    result: dict = {"splits": {}, "samples": []}
    for split in splits:
        cases = buildup_cases(n, split, seed, res)
        rows = [buildup_prompt_ids(bundle, c["items"]) for c in cases]
        uncond = [prompt_ids(bundle, "", image=True)] * len(rows)  # <s> <image>: the empty prompt
        images = generate_image_rows(bundle, rows, uncond, temperature=temperature, top_k=top_k, seed=seed,
                                     cfg_scale=cfg_scale, batch_size=batch_size, progress=True,
                                     desc=f"interleaved {split}")
        scores = []
        for c, img in zip(cases, images):
            truth = Scene.from_dict(c["truth"])
            cmp = compare_scenes(parse_scene(img), truth)
            scores.append({"exact": cmp["exact"], "parsed": cmp["parsed"], "object_recall": cmp["object_recall"]})
        result["splits"][split] = {"n": n, "accuracy": float(np.mean([s["exact"] for s in scores])),
                                   "parse_rate": float(np.mean([s["parsed"] for s in scores])),
                                   "object_recall": float(np.mean([s["object_recall"] for s in scores]))}
        result["samples"] += [{"split": split, "instruction": c["instruction"], "truth": c["truth"], "image": img, **s}
                              for c, img, s in zip(cases, images, scores)]
    return result
