"""Quality against training time: the quickstart's LM stages retrained with snapshots, each snapshot evaluated.

    python benchmarks/quality_curve.py --run runs/quickstart --steps 200 --snapshot-every 25 --sft-steps 100

Trains the tiny pretraining recipe (then the tiny SFT recipe from its final bundle) on the code shards
and image tokenizer of an existing quickstart run, with the quickstart's own overrides and launcher,
plus ``snapshot_every``. Every snapshot and both final bundles are scored with the quickstart's
evaluation functions (scene-parser judged text-to-image, exact-answer visual QA, build-up next image).
The x axis is the trainer's own count of training seconds (data preparation, model building and
snapshot writing excluded; SFT seconds are added to the pretraining's). Writes a PNG to
benchmarks/out/ and the ``quality_curve`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mmgen.quickstart import QuickstartConfig, lm_inputs, train_stage
from mmgen.utils.bench import md_table, write_section

OUT = Path(__file__).resolve().parent / "out"
PNG = OUT / "quality_curve.png"
# The tiny recipe's targets (the goal column of the quickstart_quality section).
GOALS = {"t2i_val": 0.80, "qa_val": 0.90, "buildup_val": 0.70}
LABELS = {
    "t2i_val": "text-to-image (val)",
    "t2i_heldout": "text-to-image (held-out pairs)",
    "qa_val": "visual QA exact (val)",
    "qa_heldout": "visual QA exact (held-out pairs)",
    "buildup_val": "build-up next image (val)",
}
COLORS = {
    "t2i_val": "tab:blue",
    "t2i_heldout": "tab:cyan",
    "qa_val": "tab:red",
    "qa_heldout": "tab:orange",
    "buildup_val": "tab:green",
}


def bundles(out_dir: Path) -> list[Path]:
    """Snapshots in step order, then the final bundle."""
    snaps = sorted(p for p in (out_dir / "snapshots").glob("step-*") if not p.name.endswith(".partial"))
    return [*snaps, out_dir / "final"]


def evaluate(bundle_dir: Path, n: int) -> dict:
    """The quickstart's evaluate stage, metrics only (same functions, seeds, CFG scale and temperature)."""
    from mmgen.eval.t2i import evaluate_t2i
    from mmgen.eval.understanding import evaluate_interleaved, evaluate_qa
    from mmgen.models.bundle import load_bundle

    q = QuickstartConfig()
    bundle = load_bundle(bundle_dir)
    t2i = evaluate_t2i(bundle, n=n, seed=q.eval_seed, cfg_scale=q.cfg_scale, temperature=q.temperature)["splits"]
    qa = evaluate_qa(bundle, n=n, seed=q.eval_seed)["splits"]
    inter = evaluate_interleaved(bundle, n=n, seed=q.eval_seed, temperature=q.temperature, cfg_scale=q.cfg_scale)[
        "splits"
    ]
    meta = bundle.meta
    facts = meta.get("snapshot") or {"step": meta["train"]["steps"], "train_seconds": meta["train"]["train_seconds"]}
    loss = (meta["train"].get("last_logged") or {}).get("loss", meta["train"].get("final_loss"))
    return {
        "stage": meta["stage"],
        "step": facts["step"],
        "stage_seconds": facts["train_seconds"],
        "loss": loss,
        "t2i_val": t2i["val"]["accuracy"],
        "t2i_heldout": t2i["heldout"]["accuracy"],
        "t2i_parsed": t2i["val"]["parse_rate"],
        "qa_val": qa["val"]["accuracy"],
        "qa_heldout": qa["heldout"]["accuracy"],
        "buildup_val": inter["val"]["accuracy"],
        "buildup_recall": inter["val"]["object_recall"],
        "qa_by_type": qa["val"]["by_type"],
    }


def curve(out_dir: Path, n: int, offset: float) -> list[dict]:
    points = []
    for b in bundles(out_dir):
        t0 = time.perf_counter()
        p = evaluate(b, n)
        p["train_seconds"] = offset + p["stage_seconds"]
        p["stage_dir"] = str(out_dir)
        points.append(p)
        print(
            f"[quality_curve] {p['stage']} step {p['step']}: {p['train_seconds']:.0f} s, t2i {p['t2i_val']:.3f}, "
            f"qa {p['qa_val']:.3f}, build-up {p['buildup_val']:.3f} (eval {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return points


def loss_rows(out_dir: Path, points: list[dict], offset: float) -> list[dict]:
    """The run's logged losses, placed on the training-seconds axis by the snapshots' (step, seconds)."""
    import numpy as np

    mine = [p for p in points if p["stage_dir"] == str(out_dir)]
    steps = [0] + [p["step"] for p in mine]
    secs = [offset] + [p["train_seconds"] for p in mine]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        r["train_seconds"] = float(np.interp(r["step"], steps, secs))
    return rows


def plot(points: list[dict], losses: list[dict], png: Path, n: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lx) = plt.subplots(2, 1, figsize=(7.5, 6.4), dpi=110, sharex=True, height_ratios=[3, 2])
    x = [p["train_seconds"] for p in points]
    # Several metrics sit on the same values (0 for every image metric here): shrinking markers keep
    # each line visible under the next.
    for i, (key, label) in enumerate(LABELS.items()):
        ax.plot(
            x,
            [p[key] for p in points],
            "-" if key.endswith("_val") else ":",
            marker="osD^v"[i],
            ms=8 - 1.2 * i,
            lw=2.2 - 0.3 * i,
            color=COLORS[key],
            label=label,
            mfc="none" if i % 2 else None,
        )
    for key, goal in GOALS.items():
        ax.axhline(goal, ls="--", lw=1, color=COLORS[key], alpha=0.7)
        ax.text(
            0.005,
            goal + 0.01,
            f"goal {LABELS[key].split(' (')[0]} {goal:.2f}",
            color=COLORS[key],
            fontsize=7,
            transform=ax.get_yaxis_transform(),
        )
    ax.set_ylabel(f"accuracy ({n} prompts per split)")
    ax.set_ylim(-0.03, 1.0)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("tiny recipe: quality against training time (snapshots + final bundles)", fontsize=9)
    for key in sorted({k for r in losses for k in r if k.startswith("loss")}):
        pts = [(r["train_seconds"], r[key]) for r in losses if key in r]
        lx.plot([a for a, _ in pts], [b for _, b in pts], lw=2 if key == "loss" else 1, label=key)
    lx.set_ylabel("training loss (nats)")
    lx.set_yscale("log")
    lx.legend(fontsize=7, ncol=2)
    lx.set_xlabel("training seconds (trainer's own count, 2 shared CPU cores)")
    sft = [p for p in points if p["stage"] == "sft"]
    for a in (ax, lx):
        a.grid(alpha=0.3)
        if sft:
            start = max(p["train_seconds"] for p in points if p["stage"] != "sft")
            a.axvline(start, color="gray", lw=1)
    if sft:
        ax.text(start, 0.97, " SFT from here", color="gray", fontsize=7, va="top", transform=ax.get_xaxis_transform())
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def recipe(out_dir: Path) -> str:
    """The settings the pretraining ran with, from its final bundle (recipes change; say which one ran)."""
    c = json.loads((out_dir / "final" / "mmgen.json").read_text())["config"]
    return (
        f"seq_len {c['data']['seq_len']}, micro_batch {c['micro_batch']} x grad_accum {c['grad_accum']}, "
        f"lr {c['optim']['lr']}, hidden {c['model']['hidden']} x {c['model']['layers']} layers"
    )


def section(points: list[dict], args, seconds: dict, settings: str) -> str:
    rows = [
        [
            p["stage"],
            p["step"],
            round(p["train_seconds"]),
            "n/a" if p["loss"] is None else round(p["loss"], 3),
            p["t2i_val"],
            p["t2i_heldout"],
            p["t2i_parsed"],
            p["qa_val"],
            p["qa_heldout"],
            p["buildup_val"],
            p["buildup_recall"],
        ]
        for p in points
    ]
    table = md_table(
        [
            "stage",
            "step",
            "train s",
            "loss (last logged)",
            "t2i val",
            "t2i held-out",
            "t2i parsed",
            "QA val",
            "QA held-out",
            "build-up val",
            "build-up object recall",
        ],
        rows,
    )
    wall = (
        f"training {seconds['train']:.0f} s (launcher and data preparation included), "
        if seconds["train"]
        else "training reused from an earlier run, "
    ) + f"evaluation {seconds['eval']:.0f} s"
    best = {k: max(p[k] for p in points) for k in GOALS}
    missed = [f"{LABELS[k]} best {best[k]:.3f} < {g:.2f}" for k, g in GOALS.items() if best[k] < g]
    intro = (
        f"Snapshots every {args.snapshot_every} steps of the tiny pretraining ({args.steps} steps; {settings}) and SFT "
        f"({args.sft_steps} steps) on the code shards and image tokenizer of `{args.run}`; each evaluated with the "
        f"quickstart's functions on **{args.eval_prompts} prompts per split** (the quickstart uses "
        f"{QuickstartConfig.eval_prompts}, so each value here moves in steps of {1 / args.eval_prompts:.3f}). Training "
        f"seconds are the trainer's own count (snapshot writing excluded). Wall: {wall}."
    )
    text = [
        intro,
        "",
        ("Targets missed: " + "; ".join(missed) + ".") if missed else "Every target met by some snapshot.",
        "",
        table,
        "",
        f"Plot: `benchmarks/out/{PNG.name}` (solid: val split, dotted: held-out colour-shape pairs, dashed: goals).",
    ]
    if args.note:
        text += ["", args.note]
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart", help="a quickstart run dir (codes/ and its tokenizer)")
    ap.add_argument("--out", default="runs/quality_curve", help="where the retrained runs and snapshots go")
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps (the recipe's 200)")
    ap.add_argument("--snapshot-every", type=int, default=25)
    ap.add_argument("--sft-steps", type=int, default=100, help="SFT steps (0: no SFT stage)")
    ap.add_argument("--eval-prompts", type=int, default=24, help="prompts per split (the quickstart uses 200)")
    ap.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "none"], help="as the quickstart's")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="the runs (and, for the same --eval-prompts, the scores) already in --out: no retraining",
    )
    ap.add_argument("--note", default="", help="what the plot shows, looked at by eye (goes into the section)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args()

    run, out = Path(args.run), Path(args.out)
    codes, tok = lm_inputs(run)
    lm, sft = out / "lm", out / "sft"
    state_path = out / "quality_curve.json"
    state = json.loads(state_path.read_text()) if args.reuse and state_path.is_file() else {}
    if not args.reuse:
        t0 = time.perf_counter()
        shutil.rmtree(out, ignore_errors=True)  # a fresh curve: the trainer would otherwise resume
        train_stage(
            "tiny_pretrain",
            [
                f"data.code_shards={codes}",
                f"data.image_tokenizer={tok}",
                f"out_dir={lm}",
                f"steps={args.steps}",
                f"snapshot_every={args.snapshot_every}",
            ],
            args.launcher,
        )
        if args.sft_steps:
            train_stage(
                "tiny_sft",
                [
                    f"init_from={lm / 'final'}",
                    f"data.code_shards={codes}",
                    f"out_dir={sft}",
                    f"steps={args.sft_steps}",
                    f"snapshot_every={args.snapshot_every}",
                ],
                args.launcher,
            )
        state = {"train_wall_s": time.perf_counter() - t0}
    if state.get("eval_prompts") != args.eval_prompts or "points" not in state:
        t1 = time.perf_counter()
        points = curve(lm, args.eval_prompts, 0.0)
        if args.sft_steps:
            points += curve(sft, args.eval_prompts, points[-1]["train_seconds"])
        state.update(eval_prompts=args.eval_prompts, points=points, eval_wall_s=time.perf_counter() - t1)
        state_path.write_text(json.dumps(state, indent=1))
    points = state["points"]
    losses = loss_rows(lm, points, 0.0)
    if args.sft_steps:
        losses += loss_rows(sft, points, max(p["train_seconds"] for p in points if p["stage"] != "sft"))
    seconds = {"train": state.get("train_wall_s"), "eval": state["eval_wall_s"]}
    plot(points, losses, PNG, args.eval_prompts)
    body = section(points, args, seconds, recipe(lm))
    if args.no_write:
        print(body)
    else:
        write_section("quality_curve", "Quality against training time (tiny recipe, snapshots)", body)
    print(f"[quality_curve] plot: {PNG}")


if __name__ == "__main__":
    main()
