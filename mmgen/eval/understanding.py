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


def _scenes(n: int, split: str, seed: int, tag: str, **kw) -> tuple[list, random.Random]:
    """``n`` scenes of ``split`` and the generator that drew them (questions are drawn from it next)."""
    from mmgen.world import random_scene, split_of

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
    from mmgen.world.text import answer_phrases

    words = re.findall(r"[a-z]+", text.lower())
    phrases = answer_phrases()
    for k in (2, 1):
        if len(words) >= k and " ".join(words[:k]) in phrases:
            return " ".join(words[:k])
    return words[0] if words else ""


def qa_prompt_ids(bundle, image_block: list[int], question: str) -> list[int]:
    from mmgen.inference.generate import picture_prompt_ids

    return picture_prompt_ids(bundle, question, image_block, question=True)


def qa_cases(n: int, split: str, seed: int) -> list[tuple]:
    """``n`` QA cases of ``split``: each a scene and one ``(question, answer, type)`` about it, drawn
    after all the scenes from the generator that drew them. The ``qa`` suite, the evaluation function
    and the lmms-eval task all ask the same questions for the same ``n`` and ``seed``."""
    from mmgen.world.text import qa_pairs

    scenes, rng = _scenes(n, split, seed, "qa")
    return list(zip(scenes, [qa_pairs(s, rng, n=1)[0] for s in scenes]))


def evaluate_qa(
    bundle, n: int = 64, seed: int = 0, splits=("val", "heldout"), batch_size: int = 16, options=None
) -> dict:
    """Greedy short answers to one question per scene, scored exactly, per split and per type: the
    ``qa`` suite of ``mmgen eval run``, in memory. ``options``: a GenerationOptions whose KV cache and
    accelerations the generation uses (:class:`mmgen.eval.suite_base.Context`)."""
    from mmgen.eval.suite_base import EvalOptions, function_sampling, run_in_memory
    from mmgen.eval.suites import QASuite

    suite = QASuite(splits)
    records = run_in_memory(
        suite,
        bundle,
        function_sampling(bundle, seed),
        EvalOptions(n=n, batch_size=batch_size),
        progress=True,
        generation=options,
    )
    summary = suite.summarize(records)
    return {
        "splits": {sp: {k: summary[sp][k] for k in ("n", "accuracy", "by_type")} for sp in splits},
        "samples": [{k: r[k] for k in ("split", "question", "truth", "answer", "correct")} for r in records],
    }


def resolution(bundle) -> tuple[int, int]:
    v = bundle.meta.get("image_resolution")
    return tuple(v) if v else tuple(bundle.image_tokenizer.resolution)


def buildup_cases(n: int, split: str, seed: int, res, min_images: int = 0) -> list[dict]:
    """``n`` build-up documents cut before a random step's image: the prompt items and the truth scene.
    With ``min_images``, only documents of at least that many pictures, cut before the last one (the
    longest context they give), drawn from a generator of their own."""
    from mmgen.world import make_doc, render_size

    rng = random.Random(f"buildup-{split}-{seed}" + (f"-min{min_images}" if min_images else ""))
    cases = []
    while len(cases) < n:
        doc = make_doc("buildup", rng, split=split, size=render_size(res))
        steps = [i for i, it in enumerate(doc.items) if it.kind == "image" and it.meta.get("step", 0) > 0]
        if min_images and len(steps) + 1 < min_images:
            continue
        cut = steps[-1] if min_images else rng.choice(steps)  # the image to draw; the items before it are the prompt
        cases.append(
            {"items": doc.items[:cut], "truth": doc.items[cut].meta["scene"], "instruction": doc.items[cut - 1].text}
        )
    return cases


def continuation_cases(n: int, split: str, seed: int, res) -> list[dict]:
    """``n`` build-up documents cut right after a random step's picture (not the last): the model is to
    write the next instruction and draw its picture. The truth is whatever its own instruction leads to."""
    from mmgen.world import make_doc, render_size

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
    from mmgen.processing.processor import MMGenProcessor
    from mmgen.processing.sequence import encode_prompt, encode_text

    proc = MMGenProcessor.from_bundle(bundle)
    tok = bundle.text_tokenizer
    if proc.trained_in_chat():
        first, rest = items[0], items[1:]
        ids = (
            proc.chat_prompt_ids(first.text)
            if first.kind == "text"
            else proc.chat_prompt_ids("", image_ids=proc.image_ids([first.to_pil()])[0])
        )
        for it in rest:
            ids += encode_text(it.text, tok) if it.kind == "text" else proc.image_ids([it.to_pil()])[0]
        return ids + [bundle.vocab["<image>"]]
    ids = encode_prompt("", tok, bundle.vocab, image=False)
    texts: list[str] = []
    for it in items:
        if it.kind == "text":
            texts.append(it.text)
            continue
        if texts:
            ids += encode_text(" ".join(texts), tok)
            texts = []
        ids += proc.image_ids([it.to_pil()])[0]
    if texts:
        ids += encode_text(" ".join(texts), tok)
    return ids + [bundle.vocab["<image>"]]


def evaluate_interleaved(
    bundle,
    n: int = 32,
    seed: int = 0,
    splits=("val",),
    temperature: float | None = None,
    top_k: int | None = None,
    cfg_scale: float | None = None,
    batch_size: int = 16,
    min_images: int = 0,
    options=None,
) -> dict:
    """Next-image accuracy on build-up documents, judged by the scene parser: the ``interleaved``
    suite of ``mmgen eval run``, in memory. Sampling options left None are the bundle's (its
    ``generation_config.json``); ``min_images`` as in :func:`buildup_cases`, ``options`` as in
    :func:`evaluate_qa`."""
    from mmgen.eval.interleaved_suite import InterleavedSuite
    from mmgen.eval.suite_base import EvalOptions, function_sampling, run_in_memory

    suite = InterleavedSuite()
    sampling = function_sampling(bundle, seed, temperature=temperature, top_k=top_k, cfg_scale=cfg_scale)
    records = run_in_memory(
        suite,
        bundle,
        sampling,
        EvalOptions(n=n, batch_size=batch_size, interleaved_splits=tuple(splits), interleaved_min_images=min_images),
        progress=True,
        generation=options,
    )
    summary = suite.summarize(records)
    keys = ("split", "instruction", "truth", "image", "exact", "parsed", "object_recall")
    return {
        "splits": {sp: {k: summary[sp][k] for k in ("n", "accuracy", "parse_rate", "object_recall")} for sp in splits},
        "samples": [{k: r[k] for k in keys} for r in records],
    }
