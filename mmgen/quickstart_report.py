"""``report.md`` of a quick-start run: a section per evaluation suite that ran (text-to-image, its prompts
in every surface form, visual QA, interleaved build-up documents, the image tokenizer's reconstructions),
the filter's per-defect precision and recall, and the seconds of every stage, written from the report
that :func:`mmgen.quickstart.quickstart` saves as ``report.json``."""

from __future__ import annotations

from pathlib import Path


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def write_report_markdown(r: dict, path: Path) -> None:
    """report.md: a section per suite the evaluation ran (``eval_suites`` may leave some out)."""
    lines = [
        "# mmgen quickstart report (tiny preset)",
        "",
        f"Checkpoint: `{r['checkpoint']}` — chat with it: `mmgen chat --checkpoint {r['checkpoint']}`",
        "",
        "Measured by `mmgen eval run` (sampling: "
        + ", ".join(f"{k} {v}" for k, v in r.get("sampling", {}).items() if k != "sources")
        + "): every figure's count, 95% interval and the settings that reproduce it are in "
        "[eval/report.md](eval/report.md).",
        "",
    ]
    if "t2i" in r:
        lines += [
            "## Text-to-image, judged by the ShapesWorld scene parser",
            "",
            f"Generated pictures: {r['image_decoding']}." if r.get("image_decoding") else "",
            "",
            "| split | prompts | all requested objects (shape+colour+position) | exact scene | parsed | shape | "
            "colour | size |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for split, m in r["t2i"].items():
            a = m.get("attr_acc", {})
            lines.append(
                f"| {split} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['exact_scene'])} | "
                f"{_pct(m['parse_rate'])} "
                f"| {_pct(a.get('shape'))} | {_pct(a.get('color'))} | {_pct(a.get('size'))} |"
            )
        lines += [
            "",
            "`heldout` prompts contain colour–shape pairs never seen in training.",
            "",
            "![prompts and generated images](eval/t2i_grid.png)",
            "",
        ]
    if "robust" in r:  # the same val prompts as people type them
        rb = r["robust"]
        lines += [
            "## Text-to-image per surface form of the prompt",
            "",
            "| form | prompts | all requested objects | example |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {f} | {rb[f]['n']} | {_pct(rb[f]['accuracy'])} | `{ex}` |" for f, ex in rb["examples"].items()]
        lines += ["", f"Lowest: {rb['lowest']['form']} ({_pct(rb['lowest']['value'])}).", ""]
    if "qa" in r:
        types = sorted(r["qa"]["val"]["by_type"])
        lines += [
            "## Image understanding: one question per image, exact single-word answers",
            "",
            "| split | questions | accuracy | " + " | ".join(types) + " |",
            "| --- | --- | --- |" + " --- |" * len(types),
        ]
        for split, m in r["qa"].items():
            lines.append(
                f"| {split} | {m['n']} | {_pct(m['accuracy'])} | "
                + " | ".join(_pct(m["by_type"].get(k)) for k in types)
                + " |"
            )
        lines.append("")
    if "interleaved" in r:
        lines += [
            "## Interleaved build-up documents: the next image after an instruction",
            "",
            "| split | documents | next image exact (kept objects + change) | parsed | object recall |",
            "| --- | --- | --- | --- | --- |",
        ]
        for split, m in r["interleaved"].items():
            lines.append(
                f"| {split} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['parse_rate'])} | {_pct(m['object_recall'])} |"
            )
        lines += ["", "![before, generated and expected pictures of build-up steps](eval/interleaved_grid.png)", ""]
    if "tokenizer_reconstruction" in r:
        rec = r["tokenizer_reconstruction"]
        lines += [
            "## Image tokenizer",
            "",
            f"{r['tokenizer']['type']}, {r['tokenizer']['tokens_per_image']} codes per image. "
            f"Scene-parser agreement between {rec['n']} rendered scenes and their reconstructions: "
            f"{_pct(rec['scene_agreement'])} ("
            + ", ".join(f"{k} {_pct(v)}" for k, v in rec.get("scene_agreement_by_split", {}).items())
            + f"); PSNR {rec['psnr_db']:.1f} dB.",
            "",
            "![originals and their reconstructions](eval/recon_grid.png)",
            "",
        ]
    if "inner_tokenizer_reconstruction" in r:
        inner = r["inner_tokenizer_reconstruction"]
        lines += [
            f"The image tokenizer under the code-block table, alone: {_pct(inner['scene_agreement'])} ("
            + ", ".join(f"{k} {_pct(v)}" for k, v in inner.get("scene_agreement_by_split", {}).items())
            + f"); PSNR {inner['psnr_db']:.1f} dB. The table was fitted on the train split's codes: objects of "
            "held-out colour-shape pairs are outside it and become their nearest seen object.",
            "",
        ]
    if "filter_defects" in r:
        lines += [
            "## Filtering: per-defect precision / recall against the world's labels",
            "",
            "| defect | docs | precision | recall |",
            "| --- | --- | --- | --- |",
        ]
        for name, m in sorted(r["filter_defects"].get("per_defect", {}).items()):
            lines.append(f"| {name} | {m['true']} | {_pct(m['precision'])} | {_pct(m['recall'])} |")
        fd = r["filter_defects"]
        lines += ["", f"Clean documents touched by the filter: {fd['clean_docs_touched']} of {fd['clean_docs']}.", ""]
    lines += ["## Stage times (seconds, this machine)", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["stage_seconds"].items()]
    lines += [f"| **total** | {sum(r['stage_seconds'].values()):.0f} |", ""]
    path.write_text("\n".join(lines))
