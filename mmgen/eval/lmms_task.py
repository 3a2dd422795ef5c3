"""ShapesWorld QA as an lmms-eval task: a local dataset and the task YAML, written by mmgen.

``write_qa_task(DIR)`` saves the questions (a ``datasets`` DatasetDict with a ``test`` split: the
rendered picture, the question, the one-word truth, the question type and the split of the scene)
and ``DIR/shapesworld_qa.yaml``, whose functions are the ones below; then

    lmms-eval --model mmgen --model_args pretrained=CKPT --tasks shapesworld_qa --include_path DIR

runs with no network. The questions are the ``qa`` suite's of ``mmgen eval run`` (same scenes for the
same ``n`` and ``seed``), and the answer is scored the same way (its leading ShapesWorld answer
phrase must equal the truth).
"""

from __future__ import annotations

from pathlib import Path

from mmgen.errors import MMGenError

TASK = "shapesworld_qa"


def qa_docs(n: int = 200, seed: int = 0, splits=("val", "heldout"), size: tuple[int, int] = (72, 72)) -> list[dict]:
    from mmgen.eval.understanding import qa_cases
    from mmgen.world import render

    docs = []
    for sp in splits:
        for i, (s, (q, a, t)) in enumerate(qa_cases(n, sp, seed)):
            docs.append(
                {"id": f"{sp}/{i}", "image": render(s, *size), "question": q, "answer": a, "qtype": t, "split": sp}
            )
    return docs


def write_qa_task(out: str | Path, n: int = 200, seed: int = 0, size: tuple[int, int] = (72, 72)) -> Path:
    """Write the dataset (``out/data``) and ``out/shapesworld_qa.yaml``; returns the YAML's path."""
    try:
        import datasets
    except ImportError:
        raise MMGenError("writing an lmms-eval task needs the datasets package: pip install 'mmgen[lmms]'") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = qa_docs(n, seed, size=size)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "split": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_list(docs, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(out / "data"))
    yaml = f"""# ShapesWorld visual QA for lmms-eval, written by `mmgen eval lmms-task` \
({len(docs)} questions, seed {seed}).
task: {TASK}
dataset_path: {(out / "data").resolve()}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function mmgen.eval.lmms_task.doc_to_visual
doc_to_text: !function mmgen.eval.lmms_task.doc_to_text
doc_to_target: answer
process_results: !function mmgen.eval.lmms_task.process_results
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: exact_match_heldout
    aggregation: !function mmgen.eval.lmms_task.mean_skip_none
    higher_is_better: true
metadata:
  version: 1.0
"""
    path = out / f"{TASK}.yaml"
    path.write_text(yaml)
    return path


def doc_to_visual(doc) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def process_results(doc, results) -> dict:
    """Exact match of the answer phrase; the held-out figure counts scenes with a held-out pair only."""
    from mmgen.eval.understanding import normalize_answer

    ok = float(normalize_answer(results[0] if results else "") == doc["answer"])
    return {"exact_match": ok, "exact_match_heldout": ok if doc["split"] == "heldout" else None}


def mean_skip_none(items) -> float:
    vals = [x for x in items if x is not None]
    return sum(vals) / len(vals) if vals else float("nan")
