"""``mmgen eval run``: evaluate a checkpoint on chosen suites and write a reproducible report.

    run_eval(CHECKPOINT, suites="t2i,qa", out=DIR)

writes ``DIR/report.json`` and ``DIR/report.md`` (with PNG grids of prompts, outputs and verdicts),
``DIR/samples/<suite>.jsonl`` (every judged sample, one line per finished batch) and, for GenEval,
``DIR/geneval_results.jsonl`` in GenEval's own per-image format. A rerun with the same settings
skips the batches already in ``samples/`` and gives the same numbers as an uninterrupted run.
Every number comes with its sample count and a 95% interval, and the report records the checkpoint's
hash, the sampling settings and where each came from, the inference options, the evaluator's version
and each suite's prompt-set hash.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, fields
from pathlib import Path

from mmgen.errors import MMGenError
from mmgen.eval.provenance import EVALUATOR_VERSION, checkpoint_hash, prompt_set_hash, sampling_settings
from mmgen.eval.suite_base import Context, EvalOptions, check_suites, parse_suites
from mmgen.eval.suites import SUITE_CLASSES
from mmgen.models.bundle import can_draw, check_bundle_dir, checkpoint_can_draw


def _read_done(path: Path) -> dict[str, list[dict]]:
    """Finished batches of a suite: {batch key: records}. A line cut short by a kill is dropped from
    the file (its batch runs again and is appended whole)."""
    done: dict[str, list[dict]] = {}
    if not path.is_file():
        return done
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[rec["batch"]] = rec["records"]
        kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return done


def _fingerprint(run: dict) -> dict:
    return {k: run.get(k) for k in ("checkpoint_sha256", "sampling", "options", "evaluator_version", "image_decoder")}


def run_eval(
    checkpoint: str | Path,
    suites: str | list[str] = "all",
    out: str | Path = "eval",
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    seed: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    bundle=None,
    detok: dict | None = None,
    **options,
) -> dict:
    """Evaluate ``checkpoint`` on ``suites`` (comma list of t2i, robust, geneval, qa, interleaved, recon, or all)
    and write the report into ``out``; returns the report. Sampling settings left None come from the
    checkpoint's generation_config.json, else the quick start's settings. ``options`` are
    :class:`~mmgen.eval.suite_base.EvalOptions` fields (n, prompt_seed, batch_size, geneval_prompts, ...).
    ``detok`` holds :class:`~mmgen.inference.pipeline.GenerationOptions`' ``detok_*`` fields: generated
    pictures are drawn as ``mmgen generate`` draws them, by the checkpoint's detokenizer when it has one
    (:mod:`mmgen.inference.detokenize`)."""
    from mmgen.inference.detokenize import check_detok_options, decoder_label, image_decoder
    from mmgen.inference.pipeline import GenerationOptions

    names = parse_suites(suites)
    bad = sorted(k for k in (detok or {}) if not k.startswith("detok_"))
    if bad:
        raise MMGenError(f"detok takes the detok_* generation options only, got {bad[0]!r}")
    detok_opts = GenerationOptions.build(**(detok or {}))
    check_detok_options(detok_opts)
    known = {f.name for f in fields(EvalOptions)}
    bad = sorted(set(options) - known)
    if bad:
        import difflib

        near = difflib.get_close_matches(bad[0], known, n=1)
        raise MMGenError(f"unknown eval option {bad[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    opts = EvalOptions(**options)
    if opts.n < 1 or opts.batch_size < 1:
        raise MMGenError("n and batch_size must be at least 1")
    if "robust" in names:
        from mmgen.world.surface import check_forms

        opts.robust_forms = check_forms(opts.robust_forms)  # a wrong name fails now, before any model loads
        if opts.robust_split not in ("val", "heldout"):
            raise MMGenError(f"robust_split must be val or heldout, got {opts.robust_split!r}")
    ckpt = check_bundle_dir(checkpoint)
    if opts.geneval_prompts and "geneval" in names:
        from mmgen.eval.geneval import load_metadata

        load_metadata(opts.geneval_prompts)  # a wrong file fails now, before any model loads
    check_suites(checkpoint_can_draw(ckpt), names, ckpt)  # before any weights load: the one-line error comes first
    sampling = sampling_settings(
        ckpt, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, seed=seed
    )
    ck = checkpoint_hash(ckpt)
    if bundle is None:
        from mmgen.models.bundle import load_bundle

        bundle = load_bundle(ckpt, device=device)
    check_suites(can_draw(bundle), names, ckpt)  # a bundle given in memory is checked too
    decoder = image_decoder(bundle, detok_opts) if can_draw(bundle) else None  # a misfit is a one-line error here
    decoder_info = dict(decoder.info) if decoder is not None else None
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    run = {
        "checkpoint_sha256": ck["sha256"],
        "sampling": {k: v for k, v in sampling.items() if k != "sources"},
        "options": asdict(opts),
        "evaluator_version": EVALUATOR_VERSION,
        "image_decoder": decoder_info,
    }
    # as JSON reads them back, so a resumed run's options compare equal
    run["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in run["options"].items()}
    run_file = out / "run.json"
    if run_file.is_file() and any((out / "samples").iterdir()):
        old = json.loads(run_file.read_text())
        if _fingerprint(old) != _fingerprint(run):
            diff = [k for k in _fingerprint(run) if old.get(k) != run[k]]
            raise MMGenError(
                f"{out} holds results of another run (different {', '.join(diff)}); "
                "give another --out, or delete that folder to start over"
            )
    run_file.write_text(json.dumps(run, indent=1))

    ctx = Context(out=out, sampling=sampling, opts=opts, generation=detok_opts if decoder is not None else None)
    drawn = (
        f"drawn by the {decoder_label(decoder_info)} ({decoder_info['path']})"
        if decoder_info
        else "decoded by the bundle's image tokenizer"
    )
    t0 = time.perf_counter()
    report = {
        "evaluator": {"name": "mmgen eval", "version": EVALUATOR_VERSION},
        "checkpoint": {"path": str(ckpt), "sha256": ck["sha256"], "hashed_files": ck["files"]},
        "sampling": sampling,
        "inference": {
            "device": device,
            "dtype": str(getattr(bundle.model, "dtype", "")),
            "batch_size": opts.batch_size,
            "qa_decoding": f"greedy, at most {opts.qa_max_new_tokens} new tokens",
            "image_decoding": f"one image block under the grid constraint, {drawn}",
            "image_decoder": decoder_info,
            "torch_threads": _threads(),
        },
        "options": run["options"],
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "suites": {},
    }
    for name in names:
        suite = SUITE_CLASSES[name]()
        items = suite.prepare(bundle, ctx)
        store = out / "samples" / f"{name}.jsonl"
        done = _read_done(store)
        todo = [b for b in suite.batches if b[0] not in done]
        it = todo
        if progress and todo:
            from tqdm import tqdm

            it = tqdm(
                todo,
                desc=f"eval {name}",
                unit="batch",
                initial=len(suite.batches) - len(todo),
                total=len(suite.batches),
            )
        with open(store, "a") as fh:
            for key, bi, payload in it:
                recs = suite.run_batch(bundle, bi, payload, ctx)
                fh.write(json.dumps({"batch": key, "records": recs}, default=str) + "\n")
                fh.flush()
                done[key] = recs
        records = [r for key, _, _ in suite.batches for r in done[key]]
        entry = {
            "samples": len(records),
            "resumed_batches": len(suite.batches) - len(todo),
            "prompt_set": {"sha256": prompt_set_hash(items), "size": len(items) if isinstance(items, list) else None},
            "metrics": suite.summarize(records),
        }
        suite.finish(records, ctx, entry)
        panels = suite.panels(records, ctx)
        if panels:
            from mmgen.eval.report import panel_grid

            entry["grid"] = panel_grid(panels, out / f"{name}_grid.png", cols=suite.grid_cols).name
        report["suites"][name] = entry
    report["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    from mmgen.eval.report import write_eval_markdown

    write_eval_markdown(report, out / "report.md")
    return report


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# -- compare -----------------------------------------------------------------------------------------
def _proportions(obj, path: str = "") -> dict[str, dict]:
    """Every proportion (a dict with k, n and ci95) in a report's metrics, by dotted path."""
    out = {}
    if isinstance(obj, dict):
        if {"k", "n", "ci95"} <= set(obj):
            return {path: obj}
        for k, v in obj.items():
            out.update(_proportions(v, f"{path}.{k}" if path else str(k)))
    return out


def compare_reports(a: str | Path | dict, b: str | Path | dict) -> dict:
    """Metric by metric, B minus A with Newcombe's 95% interval, plus the settings that differ."""
    from mmgen.eval.stats import difference

    def load(x):
        if isinstance(x, dict):
            return x
        p = Path(x)
        if not p.is_file():
            raise MMGenError(f"report not found: {p} (give the report.json of mmgen eval run)")
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise MMGenError(f"{p}: not JSON ({e.msg})") from None
        if "suites" not in r or "evaluator" not in r:
            raise MMGenError(f"{p}: not a report of mmgen eval run (no suites / evaluator)")
        return r

    ra, rb = load(a), load(b)
    pa = _proportions({s: e["metrics"] for s, e in ra["suites"].items()})
    pb = _proportions({s: e["metrics"] for s, e in rb["suites"].items()})
    rows = []
    for path in [p for p in pa if p in pb]:
        if pa[path]["n"] and pb[path]["n"]:
            rows.append({"metric": path, "a": pa[path], "b": pb[path], "diff": difference(pa[path], pb[path])})
    settings = {}
    for key, get in (
        ("checkpoint", lambda r: r["checkpoint"]["sha256"]),
        ("evaluator", lambda r: r["evaluator"]["version"]),
        ("sampling", lambda r: {k: v for k, v in r["sampling"].items() if k != "sources"}),
        ("options", lambda r: r.get("options")),
    ):
        if get(ra) != get(rb):
            settings[key] = {"a": get(ra), "b": get(rb)}
    for s in set(ra["suites"]) & set(rb["suites"]):
        ha, hb = ra["suites"][s]["prompt_set"]["sha256"], rb["suites"][s]["prompt_set"]["sha256"]
        if ha != hb:
            settings[f"{s}.prompt_set"] = {"a": ha, "b": hb}
    return {
        "rows": rows,
        "settings": settings,
        "only_a": sorted(set(pa) - set(pb)),
        "only_b": sorted(set(pb) - set(pa)),
    }


def format_comparison(cmp: dict) -> str:
    def pct(p):
        return f"{100 * p['value']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] n={p['n']}"

    lines = [f"{'metric':44s} {'A':30s} {'B':30s} B-A [95% CI]"]
    for r in cmp["rows"]:
        d = r["diff"]
        mark = " *" if d["significant"] else ""
        lines.append(
            f"{r['metric']:44s} {pct(r['a']):30s} {pct(r['b']):30s} "
            f"{100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]{mark}"
        )
    lines.append("* the interval excludes 0")
    for k, v in cmp["settings"].items():
        lines.append(f"setting {k} differs: A {json.dumps(v['a'], default=str)} | B {json.dumps(v['b'], default=str)}")
    for side in ("only_a", "only_b"):
        if cmp[side]:
            lines.append(f"{side.replace('_', ' in ')}: {', '.join(cmp[side])}")
    return "\n".join(lines)
