"""The lmms-eval plug-in: lmms-eval's registry finds the ``mmgen`` model through the entry point that
pyproject.toml declares, the model answers lmms-eval's three request types, and lmms-eval's own
command line runs the ShapesWorld QA task mmgen writes, offline. (`make install` installs lmms-eval.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("lmms_eval", reason="the mmgen[lmms] extra (make install installs it)")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _pil_truncated_images():
    """lmms-eval sets PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES when it is imported, which would
    let corrupt images load in later tests of this worker (mmgen's filter must reject them): put it back."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


@pytest.fixture()
def entry_point(tmp_path, monkeypatch):
    """The entry point as pyproject.toml declares it, visible to importlib.metadata: from the installed
    mmgen when its metadata has it, else from a distribution record written from pyproject.toml."""
    from importlib.metadata import entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"mmgen": "mmgen.eval.lmms_plugin:manifest"}
    if not any(ep.name == "mmgen" for ep in entry_points(group="lmms_eval.models")):
        d = tmp_path / "site" / "mmgen_entry_points-0.dist-info"
        d.mkdir(parents=True)
        (d / "METADATA").write_text("Metadata-Version: 2.1\nName: mmgen-entry-points\nVersion: 0\n")
        lines = "".join(f"{k} = {v}\n" for k, v in declared.items())
        (d / "entry_points.txt").write_text("[lmms_eval.models]\n" + lines)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return declared


def test_registry_finds_the_mmgen_model(entry_point):
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    reg = ModelRegistryV2()
    reg.load_entrypoint_manifests()
    cls = reg.get_model_class("mmgen")
    from mmgen.eval.lmms_model import MMGenLMM

    assert cls is MMGenLMM and issubclass(cls, lmms) and cls.is_simple


class _Req:
    def __init__(self, *args):
        self.args = args


def test_model_answers_the_three_request_types(bundle_dir, tmp_path):
    import random

    from mmgen.eval.lmms_model import MMGenLMM
    from mmgen.inference.batch_generation import generate_text_rows
    from mmgen.inference.generate import image_ids, picture_prompt_ids
    from mmgen.world import random_scene, render

    lm = MMGenLMM(pretrained=str(bundle_dir), output_dir=str(tmp_path / "imgs"), mode="t2i", temperature=1.0)
    img = render(random_scene(random.Random(0), "val"), 32, 32)
    docs = {"task": {"test": [{"image": img, "q": "What color is the circle?"}, {"q": "a red circle"}]}}
    lm.task_dict = docs
    visual = lambda d: [d["image"]] if "image" in d else []  # noqa: E731
    # generate_until: a question about a picture is answered in text; a prompt without one draws (t2i mode)
    question = _Req("What color is the circle?", {"max_new_tokens": 4, "until": ["\n"]}, visual, 0, "task", "test")
    answer, drawn = lm.generate_until([question, _Req("a red circle", {}, visual, 1, "task", "test")])
    row = picture_prompt_ids(lm.bundle, "What color is the circle?", image_ids(lm.bundle, [img])[0], question=True)
    assert answer == generate_text_rows(lm.bundle, [row], max_new_tokens=4)[0].split("\n")[0].strip()
    out = json.loads(drawn)
    assert out["text"] == "" and len(out["images"]) == 1 and Path(out["images"][0]).is_file()
    # loglikelihood: the greedy continuation is greedy, another one is not, and both are log-probabilities
    greedy = generate_text_rows(lm.bundle, [row], max_new_tokens=1)[0]
    ((lp, is_greedy),) = lm.loglikelihood(
        [_Req("What color is the circle?", " " + greedy if greedy else "x", visual, 0, "task", "test")]
    )
    assert lp <= 0.0
    # multi-round: round 0 answers the context, then doc_to_text leads until it says stop
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=0, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        return [doc["image"]], f"round {round_idx}?", round_idx == 3, None, {"k": round_idx}

    lm.mode = "text"
    (rounds,) = lm.generate_until_multi_round(
        [_Req("first?", {"max_new_tokens": 3}, visual, doc_to_text, 0, "task", "test")]
    )
    assert len(rounds) == 3 and [s[0] for s in seen] == [1, 2, 3]
    assert seen[1][1] == list(rounds[:2]) and seen[1][2] == {"k": 1} and seen[2][2] == {"k": 2}


def test_lmms_eval_runs_the_shapesworld_qa_task_offline(entry_point, bundle_dir, tmp_path):
    """lmms-eval's evaluator (what its command line calls) on the task YAML and local dataset mmgen
    writes; the task manager reads only that folder, not lmms-eval's hundreds of bundled tasks."""
    from mmgen.eval.lmms_cli import main
    from mmgen.eval.lmms_task import write_qa_task
    from mmgen.utils.compat import ensure_torchvision

    ensure_torchvision()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    if "mmgen" not in MODEL_REGISTRY_V2.list_model_names():  # lmms-eval was imported before the entry point was visible
        MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)
    write_qa_task(tmp_path / "tasks", n=2, size=(32, 32))
    out = simple_evaluate(
        model="mmgen",
        model_args=f"pretrained={bundle_dir},output_dir={tmp_path / 'imgs'}",
        tasks=["shapesworld_qa"],
        batch_size=1,
        bootstrap_iters=0,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    r = out["results"]["shapesworld_qa"]
    samples = out["samples"]["shapesworld_qa"]
    assert len(samples) == 4 and out["n-samples"]["shapesworld_qa"]["effective"] == 4
    assert r["exact_match,none"] == sum(s["exact_match"] for s in samples) / 4
    heldout = [s["exact_match"] for s in samples if s["doc"]["split"] == "heldout"]
    assert len(heldout) == 2 and r["exact_match_heldout,none"] == sum(heldout) / 2
    # the launcher hands its arguments to lmms-eval's own command line
    assert main(["--help"]) == 0
