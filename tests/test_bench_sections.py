"""BENCHMARKS.md plumbing (mmgen.utils.bench): each script's section is replaced in place, and the table of
contents follows the sections."""

from __future__ import annotations


def test_sections_are_replaced_in_place_and_listed_in_the_contents(tmp_path):
    from mmgen.utils.bench import heading_anchor, write_section

    md = tmp_path / "BENCHMARKS.md"
    write_section("a", "Speed: packing + DeepSpeed", "first", path=md, command="python benchmarks/a.py")
    write_section("b", "`mmgen generate` -> images", "second", path=md, command="python benchmarks/b.py")
    write_section("a", "Speed: packing + DeepSpeed", "first, rerun", path=md, command="python benchmarks/a.py")
    text = md.read_text()
    assert text.count("<!-- bench:a -->") == 1 and "first, rerun" in text and "first\n" not in text
    assert text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->")  # a rerun keeps its place
    assert text.count("<!-- contents -->") == 1 and text.index("<!-- /contents -->") < text.index("<!-- bench:a")
    assert "- [Speed: packing + DeepSpeed](#speed-packing--deepspeed)" in text
    assert "- [`mmgen generate` -> images](#mmgen-generate---images)" in text
    assert heading_anchor("Quickstart quality (make demo, tiny preset)") == "quickstart-quality-make-demo-tiny-preset"
