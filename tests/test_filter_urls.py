"""`mmgen filter` on documents whose images are URLs not fetched (MMC4, OBELICS as distributed): they
are kept as references, judged by no pixel operator and counted, never quarantined or stripped; the
console summary counts node quarantines too."""

from __future__ import annotations

from pathlib import Path

from mmgen.data.doc import Doc
from mmgen.data.pipeline import run_filter
from mmgen.data.shards import read_shard

DATA = Path(__file__).parent / "data"
RECIPE = {
    "name": "urls",
    "ops": [
        {"op": "empty_items"},
        {"op": "image_decode"},
        {"op": "image_shape_filter", "params": {"min_width": 10, "min_height": 10}},
        {"op": "image_doc_near_dedup"},
        {"op": "url_dedup", "level": "node"},
        {"op": "image_dedup"},
        {"op": "doc_dedup"},
    ],
}


def test_url_images_are_kept_unjudged_and_counted(tmp_path, capsys):
    from mmgen.commands.filter import summary_line

    s = run_filter(
        RECIPE,
        [str(DATA / "mmc4_sample.jsonl"), str(DATA / "obelics_sample.jsonl")],
        tmp_path / "o",
        workers=1,
        progress=False,
    )
    assert (s["input"], s["kept"], s["rejected"], s["quarantined"]) == (5, 5, 0, 0)
    # 10 URL images; the OBELICS bus photo has the URL of an MMC4 one: url_dedup needs no bytes to see it.
    assert (s["nodes_removed"], s["nodes_quarantined"], s["media_not_fetched"]) == (1, 0, 9)
    assert s["per_reason"]["nodes_removed"] == {"duplicate_url": 1}
    kept = [d for p in sorted((tmp_path / "o/shards").glob("*.tar")) for d in read_shard(p) if isinstance(d, Doc)]
    media = [m for d in kept for m in d.media]
    assert len(media) == 9 and all(m.url.startswith("http://127.0.0.1:8765/") and not m.fetched for m in media)
    line = summary_line(s, "o")
    assert "1 removed, 0 quarantined)" in line and "9 media URLs not fetched" in line and "mmgen fetch" in line
    assert "--media-root" not in line
    report = (tmp_path / "o/report.md").read_text()
    assert "9 media URLs in kept documents were not fetched" in report


def test_console_summary_counts_node_quarantines(tmp_path, real_dir, capsys):
    from mmgen.cli import main
    from mmgen.data.doc import Image, Text
    from mmgen.data.formats import write_records

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    docs = [
        Doc(
            items=[
                Text("a real photo and a broken one"),
                Image(path=str(real_dir / "cat.jpg")),
                Image(path=str(broken)),
            ]
        )
    ]
    write_records(docs, tmp_path / "in.jsonl", "mmgen")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("ops:\n  - op: image_decode\n")
    rc = main(["filter", "-r", str(recipe), "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o"), "-w", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 docs: 1 kept (1 of them lost items: 0 removed, 1 quarantined), 0 rejected, 0 quarantined" in out
