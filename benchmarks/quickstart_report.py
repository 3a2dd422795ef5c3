"""Copy the quality numbers of a quickstart run (``make demo``) into BENCHMARKS.md.

    make demo && python benchmarks/quickstart_report.py --report runs/quickstart/report.json

The quickstart itself measures (scene-parser judgements of generated images, exact QA answers);
this script only tabulates its report.json beside the stage times, so the section says which run
the numbers come from, and keeps the run's text-to-image grid in the repository
(benchmarks/quickstart_t2i_grid.png; benchmarks/out/ is not tracked).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mmgen.utils.bench import md_table, write_section

GRID = Path(__file__).parent / "quickstart_t2i_grid.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="runs/quickstart/report.json")
    ap.add_argument("--note", default="", help="conditions of the run (e.g. machine load)")
    args = ap.parse_args()
    r = json.loads(Path(args.report).read_text())
    rows = [
        ["text-to-image, all requested objects (val)", r["t2i"]["val"]["n"], r["t2i_accuracy"], ">= 0.80"],
        [
            "text-to-image, held-out colour-shape pairs",
            r["t2i"]["heldout"]["n"],
            r["t2i_accuracy_heldout_compositions"],
            "reported",
        ],
        [
            "text-to-image, share of images the scene parser can read (val)",
            r["t2i"]["val"]["n"],
            r["t2i"]["val"]["parse_rate"],
            "reported",
        ],
        ["visual QA, exact answer (val)", r["qa"]["val"]["n"], r["qa_accuracy"], ">= 0.90"],
        ["visual QA, held-out pairs", r["qa"]["heldout"]["n"], r["qa_accuracy_heldout_compositions"], "reported"],
        ["build-up next image exact (val)", r["interleaved"]["val"]["n"], r["interleaved_accuracy"], ">= 0.70"],
    ]
    rec, inner = r["tokenizer_reconstruction"], r.get("inner_tokenizer_reconstruction")
    if inner:  # the LM reads code blocks: the image tokenizer alone, then through the table, per split
        rows.append(
            ["image tokenizer reconstruction, scene agreement", inner["n"], inner["scene_agreement"], ">= 0.98"]
        )
        rows += [
            [f"reconstruction through the code-block table, {split} scenes", "", v, "reported"]
            for split, v in rec.get("scene_agreement_by_split", {}).items()
        ]
    else:
        rows.append(["tokenizer reconstruction, scene agreement", rec["n"], rec["scene_agreement"], ">= 0.98"])
    forms = {k: v for k, v in r.get("robust", {}).items() if isinstance(v, dict) and "accuracy" in v}
    if forms:  # the robust suite: the t2i prompts in the surface forms people type
        low = r["robust"]["lowest"]
        rows.append(
            [
                f"text-to-image, lowest of {len(forms)} prompt surface forms (val; {low['form']})",
                low["n"],
                low["value"],
                "reported",
            ]
        )
    times = [[k, round(v)] for k, v in r["stage_seconds"].items()] + [
        ["total", round(sum(r["stage_seconds"].values()))]
    ]
    body = (f"{args.note}\n\n" if args.note else "") + md_table(["metric", "n", "value", "goal"], rows)
    if forms:
        body += "\n\nText-to-image accuracy per prompt surface form (`mmgen eval run --suite robust`):\n\n"
        body += md_table(
            ["form", "n", "accuracy", "example"],
            [[k, v["n"], v["accuracy"], r["robust"].get("examples", {}).get(k, "")] for k, v in forms.items()],
        )
    if r.get("image_decoding"):
        body += f"\n\nGenerated pictures: {r['image_decoding']}."
    body += "\n\nStage seconds:\n\n" + md_table(["stage", "seconds"], times)
    grid = Path(args.report).parent / "t2i_grid.png"
    if grid.is_file():
        shutil.copyfile(grid, GRID)
        body += (
            f"\n\nGenerated images: `benchmarks/{GRID.name}` (the run's t2i_grid.png: 12 val prompts, then 12 "
            "held-out-pair prompts, each with the parser's verdict)."
        )
    write_section("quickstart_quality", "Quickstart quality (make demo, tiny preset)", body)


if __name__ == "__main__":
    main()
