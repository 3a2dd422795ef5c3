"""The ShapesWorld recipe against a world's labelled defects, and the scoring itself.

The filter's quality goal is asserted on a small world: precision and recall >= 0.95 for every defect
type and >= 98% of clean documents untouched (the 2,400-doc measurement is in data_pipelines/README.md,
"Quality on ShapesWorld"). At a defect rate of 0.5 each of the 12 types has about 20 examples, so
one miss is a recall of 0.95.
"""

from __future__ import annotations

import json

from mmgen.data.pipeline import run_filter, score_against_labels
from mmgen.world.documents import DEFECT_TYPES, write_world


def test_shapesworld_recipe_on_a_labelled_world(tmp_path):
    world = tmp_path / "world"
    write_world(
        world,
        n_docs=600,
        seed=31,
        defect_rate=0.5,
        shard_size=200,
        mix="caption=0.4,qa=0.3,buildup=0.3",
        progress=False,
    )
    s = run_filter("shapesworld", str(world / "*.tar"), tmp_path / "out", workers=1, progress=False, report=False)
    assert s["balanced"] and s["input"] == 600
    score = score_against_labels(tmp_path / "out", world / "labels.jsonl")
    labels = [json.loads(x) for x in (world / "labels.jsonl").open()]
    per = score["per_defect"]
    for t, row in per.items():  # the truth side comes from the labels, nothing else
        assert row["true"] == sum(any(d["type"] == t for d in lab["defects"]) for lab in labels)
    assert set(per) == set(DEFECT_TYPES)
    for t in DEFECT_TYPES:
        assert per[t]["true"] >= 20, t  # so that a 0.95 recall can resolve one miss
        assert per[t]["precision"] >= 0.95, (t, per[t])
        assert per[t]["recall"] >= 0.95, (t, per[t])
    assert score["clean_kept_fraction"] >= 0.98, score


def test_scoring_definitions(tmp_path):
    """Precision = flagged-and-true / flagged, recall = flagged-and-true / true, per defect type;
    documents are matched by their input position (the shard member's index prefix)."""
    labels = [
        {"id": "a", "defects": []},
        {"id": "b", "defects": [{"type": "gibberish_text"}]},
        {"id": "c", "defects": [{"type": "gibberish_text"}]},
        {"id": "d", "defects": [{"type": "tiny_image"}]},
    ]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    out = tmp_path / "out"
    (out / "rejects").mkdir(parents=True)
    (out / "quarantine").mkdir()
    rows = [
        {"id": "a", "provenance": {"member": "00000000_a"}, "level": "node", "reason": "gibberish"},
        {
            "id": "b",
            "provenance": {"member": "00000001_b"},
            "level": "doc",
            "reason": "no_items_left",
            "removed_nodes_before": [{"reason": "gibberish"}],
        },
        {"id": "d", "provenance": {"member": "00000003_d"}, "level": "node", "reason": "image_too_small"},
    ]
    (out / "rejects" / "00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = score_against_labels(out, tmp_path / "labels.jsonl")
    assert s["per_defect"]["gibberish_text"] == {"true": 2, "flagged": 2, "tp": 1, "precision": 0.5, "recall": 0.5}
    assert s["per_defect"]["tiny_image"]["precision"] == 1.0 and s["per_defect"]["tiny_image"]["recall"] == 1.0
    assert (s["clean_docs"], s["clean_docs_touched"], s["clean_kept_fraction"]) == (1, 1, 0.0)
