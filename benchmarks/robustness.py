"""Robust prompts: text-to-image accuracy in every surface form people type, before and after training on
varied prompts (``data.prompt_variation``), with visual QA and build-up beside it.

    python benchmarks/robustness.py --run runs/quickstart --out runs/robustness

Both arms train the quickstart run's LM stages (the tiny pretraining, then SFT) again on the run's own
code shards and image tokenizer, with the quickstart's launcher and overrides; world, filter and
tokenizers are the run's. *Before* trains with ``data.prompt_variation=0`` (every prompt as the world
writes it, ``OUT/before``), *after* with ``--variation`` (the recipes' value when not given, ``OUT``);
nothing else differs. ``--before BUNDLE`` / ``--after BUNDLE`` evaluate a bundle trained elsewhere
instead (a quickstart run made by recipes without varied prompts is a *before*), and ``--train-only
before|after`` trains one arm and stops, so the two can train at once. Both bundles go through ``mmgen
eval run`` with the quick start's sampling settings and seed, suites robust (every val prompt in each
surface form of :data:`mmgen.world.surface.SURFACE_FORMS`), qa and interleaved, ``--n`` prompts
per form and split. The ``robustness`` section of BENCHMARKS.md holds each form's accuracy with its 95%
interval, after - before with Newcombe's interval, and QA and build-up. Training and evaluation resume
where they stopped (``--out`` keeps both).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmgen.eval.stats import difference
from mmgen.quickstart import QuickstartConfig, lm_inputs, train_stage
from mmgen.utils.bench import md_table, write_section

GOALS = {"t2i": 0.90, "qa": 0.90, "buildup": 0.80}
SUITES = "robust,qa,interleaved"


def retrain(run: Path, out: Path, variation: float | None, overrides: list[str]) -> tuple[Path, float]:
    """The run's pretrain and SFT stages again on its code shards and image tokenizer, ``overrides`` on
    both; (final bundle, wall seconds of this call: ~0 when both stages were already done)."""
    from mmgen.inference.settings import SamplingSettings, save_generation_config

    q = QuickstartConfig()
    codes, tok = lm_inputs(run)
    extra = ([] if variation is None else [f"data.prompt_variation={variation}"]) + list(overrides)
    t0 = time.perf_counter()
    lm, sft = out / "lm", out / "sft"
    if not (lm / "final" / "mmgen.json").is_file():
        train_stage(
            q.train_recipe,
            [f"data.code_shards={codes}", f"data.image_tokenizer={tok}", f"out_dir={lm}", *q.train_overrides, *extra],
            q.launcher,
        )
    if not (sft / "final" / "mmgen.json").is_file():
        train_stage(
            q.sft_recipe,
            [f"init_from={lm / 'final'}", f"data.code_shards={codes}", f"out_dir={sft}", *q.sft_overrides, *extra],
            q.launcher,
        )
    save_generation_config(sft / "final", SamplingSettings(temperature=q.temperature, cfg_scale=q.cfg_scale))
    return sft / "final", time.perf_counter() - t0


def evaluate(bundle: Path, out: Path, n: int) -> dict:
    """``mmgen eval run`` with the quick start's evaluation settings (resumes in ``out``)."""
    from mmgen.eval.run import run_eval

    q = QuickstartConfig()
    return run_eval(
        bundle, SUITES, out, temperature=q.temperature, top_k=0, top_p=1.0, cfg_scale=q.cfg_scale, seed=q.eval_seed, n=n
    )


def variation_of(bundle: Path) -> float:
    """The share of varied prompts the bundle's stages trained on (its SFT config and its init's)."""
    cfg = json.loads((bundle / "mmgen.json").read_text()).get("config", {})
    return float(cfg.get("data", {}).get("prompt_variation", 0.0))


def _pct(p: dict) -> str:
    return f"{100 * p['value']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] {p['k']}/{p['n']}"


def _diff(a: dict, b: dict) -> str:
    d = difference(a, b)
    return f"{100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]" + (
        " *" if d["significant"] else ""
    )


def section(before: dict, after: dict, info: dict) -> str:
    rb, ra = before["suites"]["robust"], after["suites"]["robust"]
    forms = list(ra["forms"])
    rows = []
    for f in forms:
        a, b = rb["metrics"][f]["intervals"]["all_objects"], ra["metrics"][f]["intervals"]["all_objects"]
        rows.append(
            [f, f"`{ra['forms'][f]}`", _pct(a), _pct(b), _diff(a, b), "met" if b["value"] >= GOALS["t2i"] else "missed"]
        )
    lb, la = rb["metrics"]["lowest"], ra["metrics"]["lowest"]
    rows.append(
        [
            "**lowest form**",
            f"before {lb['form']}, after {la['form']}",
            _pct(lb),
            _pct(la),
            _diff(lb, la),
            "met" if la["value"] >= GOALS["t2i"] else "missed",
        ]
    )
    others = []
    for label, suite, key, goal in (
        ("visual QA, exact answer (val)", "qa", "accuracy", GOALS["qa"]),
        ("visual QA, held-out pairs", "qa", None, None),
        ("build-up next image exact (val)", "interleaved", "exact", GOALS["buildup"]),
    ):
        if key is None:
            a, b = (r["suites"]["qa"]["metrics"]["heldout"]["intervals"]["accuracy"] for r in (before, after))
        else:
            a, b = (r["suites"][suite]["metrics"]["val"]["intervals"][key] for r in (before, after))
        others.append(
            [
                label,
                _pct(a),
                _pct(b),
                _diff(a, b),
                "reported" if goal is None else ("met" if b["value"] >= goal else "missed") + f" (>= {goal:.2f})",
            ]
        )
    s = before["sampling"]
    arms = "; ".join(
        f"{k}: `{info['bundles'][k]}`, data.prompt_variation {info['variation'][k]}"
        + (
            f", {info['train_seconds'][k] / 60:.0f} min of training in this call"
            if info["train_seconds"].get(k, 0) > 60
            else ""
        )
        for k in ("before", "after")
    )
    retrained = (
        f"The {' and '.join(info['retrained'])} arm{'s' if len(info['retrained']) > 1 else ''} trained the run's LM "
        "stages again on its code shards and image tokenizer, with data.prompt_variation as below in pretraining "
        "and SFT" + (f" and overrides {' '.join(info['overrides'])}" if info["overrides"] else "") + ". "
        if info["retrained"]
        else ""
    )
    text = [
        retrained + f"Bundles: {arms}. "
        f"Both evaluated by `mmgen eval run --suite {SUITES}` at the quick start's settings (temperature "
        f"{s['temperature']}, CFG scale {s['cfg_scale']}, seed {s['seed']}), {info['n']} val prompts per form: "
        "every form of a prompt is drawn with the same seeds, so forms differ in their text alone; `as_written` is the "
        "t2i suite's val figure. Each value: accuracy (every requested object with its shape, colour and cell) "
        "[Wilson 95% interval] k/n; after - before in points with Newcombe's 95% interval (* excludes 0).",
        "",
        md_table(["form", "example", "before", "after", "after - before", f"goal >= {GOALS['t2i']:.2f}"], rows),
        "",
        md_table(["metric", "before", "after", "after - before", "goal"], others),
        "",
        f"Evaluation wall time in this call: before {info['eval_seconds']['before'] / 60:.1f} min, after "
        f"{info['eval_seconds']['after'] / 60:.1f} min (reports: `{info['reports']['before']}`, "
        f"`{info['reports']['after']}`).",
    ]
    if info.get("note"):
        text += ["", info["note"]]
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart", help="a quickstart run whose tokenizer stages are done")
    ap.add_argument("--out", default="runs/robustness", help="where the retrained LM stages and both evaluations go")
    ap.add_argument(
        "--variation",
        type=float,
        default=None,
        help="data.prompt_variation of the after arm (default: the recipes' own)",
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both LM stages of both arms (repeatable; e.g. steps=50 for a quick look)",
    )
    ap.add_argument("--before", default=None, help="a bundle to evaluate as the before arm instead of training it")
    ap.add_argument("--after", default=None, help="a bundle to evaluate as the after arm instead of training it")
    ap.add_argument(
        "--train-only",
        choices=["before", "after"],
        default=None,
        help="train this arm and stop (run the other arm in another process to train both at once)",
    )
    ap.add_argument(
        "--n", type=int, default=200, help="val prompts per form, questions and build-up documents per split"
    )
    ap.add_argument("--note", default="", help="conditions of the run (goes into the section)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    run, out = Path(args.run), Path(args.out)
    arms = {"before": (args.before, out / "before", 0.0), "after": (args.after, out, args.variation)}
    bundles, train_seconds = {}, {}
    for label in ("before", "after") if args.train_only is None else (args.train_only,):
        given, where, variation = arms[label]
        if given:
            bundles[label], train_seconds[label] = Path(given), 0.0
        else:
            bundles[label], train_seconds[label] = retrain(run, where, variation, args.override)
    if args.train_only:
        print(f"[robustness] {args.train_only}: {bundles[args.train_only]}")
        return
    reports, seconds = {}, {}
    for label, bundle in bundles.items():
        t0 = time.perf_counter()
        reports[label] = evaluate(bundle, out / f"eval_{label}", args.n)
        seconds[label] = time.perf_counter() - t0
    info = {
        "bundles": {k: str(v) for k, v in bundles.items()},
        "variation": {k: variation_of(v) for k, v in bundles.items()},
        "retrained": [k for k in arms if not arms[k][0]],
        "train_seconds": train_seconds,
        "n": args.n,
        "eval_seconds": seconds,
        "overrides": args.override,
        "reports": {k: str(out / f"eval_{k}" / "report.json") for k in reports},
        "note": args.note,
    }
    body = section(reports["before"], reports["after"], info)
    if args.no_write:
        print(body)
    else:
        write_section(
            "robustness", "Robust prompts: text-to-image per surface form, before and after varied prompts", body
        )


if __name__ == "__main__":
    main()
