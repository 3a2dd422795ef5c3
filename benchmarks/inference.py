"""Inference engine: prefill pruning, speculative Jacobi decoding, KV-cache compression, and all of them
at once, each against the plain pipeline on the same checkpoint, side by side in one run.

    python benchmarks/inference.py                                  # trains the substrate once, then every section
    python benchmarks/inference.py --run runs/quickstart --sections prune,kv --n 100

**The substrate.** The quick start's LM reads and writes 9 code-block tokens a picture, too few for any
of these methods to matter. This script therefore trains (once; cached under ``--out``) the quick-start
recipe with its LM on the 81 pixel codes of a picture and 4 layers (``training/inference_substrate.yaml``:
96 tokens a picture), from the code shards and DualViTok tokenizer of a quick-start run (``--run``), with
mmgen's own training entry point (:func:`mmgen.quickstart.train_stage`, what ``mmgen train`` runs), then
the quick start's SFT; and a continuous-input variant (``inference_substrate_continuous.yaml``: the
discrete one's bundle learns, as LLaVA's first stage, to read its pictures as codebook vectors through a
new MLP projector on its frozen decoder). Their baseline accuracies come
from mmgen's evaluation functions (the suites of ``mmgen eval run``): text-to-image, visual QA and
build-up next image, judged by the ShapesWorld scene parser.

**The sections** (each runs when ``GenerationOptions`` has its options, and is skipped with the reason
printed otherwise):

- ``prune``: prefill FLOPs (analytic, :mod:`mmgen.inference.cost`) and prefill wall time against QA and
  build-up accuracy, at keep ratios 0.75 / 0.5 / 0.25 / 0.1, per method beside random and uniform-stride
  selection;
- ``spec``: forward passes per image and wall time against text-to-image accuracy, guidance on, and the
  relaxed acceptance's delta against passes and accuracy;
- ``kv``: KV bytes held against build-up accuracy on documents of at least 4 pictures;
- ``all``: pruning + KV compression + speculative decoding + guidance on the same documents: end-to-end
  wall time and accuracy.

Each section's results are kept in ``--out/results.json``; BENCHMARKS.md's ``inference`` section is
rewritten from all of them after every run, and its plots go to ``benchmarks/inference_*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from mmgen.utils.bench import md_table, write_section

HERE = Path(__file__).resolve().parent
SECTIONS = ("substrate", "prune", "spec", "kv", "all")
# The substrate's two variants: the recipe each trains with (in training/). The continuous one starts from
# the discrete one's final bundle (a projector aligned on its frozen decoder).
VARIANTS = {"discrete": "inference_substrate", "continuous": "inference_substrate_continuous"}
KEEP_RATIOS = (0.75, 0.5, 0.25, 0.1)
PREFIXES = {"prune": "prune_", "spec": "spec_", "kv": "kv_"}
WHAT = {"prune": "prefill pruning", "spec": "speculative Jacobi decoding", "kv": "KV-cache compression"}


# -- the substrate ----------------------------------------------------------------------------------
def _stage_facts(bundle_dir: Path, wall: float) -> dict:
    meta = json.loads((Path(bundle_dir) / "mmgen.json").read_text())
    t = meta["train"]
    return {"stage": meta["stage"], "steps": t["steps"], "train_seconds": t["train_seconds"], "wall_seconds": wall,
            "loss": (t.get("last_logged") or {}).get("loss", t.get("final_loss")),
            "tokens_per_s": t.get("tokens_per_s")}


def train_substrate(run: Path, out: Path, variant: str, steps: int | None, sft_steps: int | None, launcher: str,
                    overrides: list[str] = (), init_from: str | None = None) -> dict:
    """Train (or find, from an earlier run) one substrate variant with mmgen's training entry point: the
    discrete one is the substrate recipe's pretraining, then the quick start's SFT recipe from its bundle;
    the continuous one aligns a projector on ``init_from`` (the discrete one's final bundle). The quick
    start's sampling settings are saved beside the final bundle."""
    from mmgen.inference.settings import SamplingSettings, save_generation_config
    from mmgen.quickstart import QuickstartConfig, lm_inputs, train_stage

    facts_path = out / variant / "substrate.json"
    if facts_path.is_file():
        facts = json.loads(facts_path.read_text())
        if (Path(facts["bundle"]) / "config.json").is_file():
            print(f"[inference] substrate {variant}: trained in an earlier run, {facts['bundle']}")
            return facts
    codes, tok = lm_inputs(run, code_blocks=False)
    q = QuickstartConfig()
    over = [f"data.code_shards={codes}", f"data.image_tokenizer={tok}", f"out_dir={out / variant / 'lm'}",
            *([f"steps={steps}"] if steps else []), *([f"init_from={init_from}"] if init_from else []), *overrides]
    stages = []
    t0 = time.perf_counter()
    final = train_stage(VARIANTS[variant], over, launcher)
    stages.append(_stage_facts(final, time.perf_counter() - t0))
    if variant == "discrete":
        # Rows of 1024 tokens (the pretraining's) rather than the SFT recipe's 512, at the same tokens per
        # step: a build-up document of five 96-token pictures does not fit 512 and would be cut between them.
        sft_over = [f"init_from={final}", f"data.code_shards={codes}", f"out_dir={out / variant / 'sft'}",
                    "data.seq_len=1024", "micro_batch=2", *([f"steps={sft_steps}"] if sft_steps else [])]
        t1 = time.perf_counter()
        final = train_stage(q.sft_recipe, sft_over, launcher)
        stages.append(_stage_facts(final, time.perf_counter() - t1))
    save_generation_config(final, SamplingSettings(temperature=q.temperature, cfg_scale=q.cfg_scale))
    c = json.loads((Path(final) / "config.json").read_text())  # the model as built, whatever the last stage's recipe says
    t = c["text_config"]
    facts = {"variant": variant, "recipe": VARIANTS[variant], "bundle": str(final), "run": str(run),
             "code_shards": str(codes), "image_tokenizer": str(tok), "launcher": launcher, "stages": stages,
             "model": {"hidden": t["hidden_size"], "layers": t["num_hidden_layers"], "heads": t["num_attention_heads"],
                       "image_feature_dim": c.get("image_feature_dim")},
             "threads": os.environ.get("OMP_NUM_THREADS", "unset"), "init_from": init_from}
    facts_path.write_text(json.dumps(facts, indent=1))
    return facts


def tokens_per_picture(bundle) -> int:
    """Tokens one picture block takes in the bundle's layout (markers included)."""
    from mmgen.inference.generate import default_image_sizes

    h, w = default_image_sizes(bundle)[0]
    return bundle.vocab.image_block_len(h, w)


def baseline(bundle, n: int, cfg_scale: float, seed: int) -> dict:
    """The substrate's accuracies with mmgen's evaluation functions at the quick start's settings (its
    temperature, no guidance), text-to-image also with guidance at ``cfg_scale``."""
    from mmgen.eval.t2i import evaluate_t2i
    from mmgen.eval.understanding import evaluate_interleaved, evaluate_qa

    out, t0 = {}, time.perf_counter()
    for key, cfg in (("t2i", None), ("t2i_cfg", cfg_scale)):
        r = evaluate_t2i(bundle, n=n, seed=seed, cfg_scale=cfg)["splits"]
        out[key] = {sp: {k: r[sp][k] for k in ("n", "accuracy", "parse_rate", "exact_scene")} for sp in r}
    r = evaluate_qa(bundle, n=n, seed=seed)["splits"]
    out["qa"] = {sp: {k: r[sp][k] for k in ("n", "accuracy")} for sp in r}
    r = evaluate_interleaved(bundle, n=n, seed=seed)["splits"]
    out["buildup"] = {sp: {k: r[sp][k] for k in ("n", "accuracy", "parse_rate", "object_recall")} for sp in r}
    out["seconds"] = time.perf_counter() - t0
    return out


# -- which methods this checkout has --------------------------------------------------------------
def method_options(section: str) -> list[str]:
    """The ``GenerationOptions`` fields of a section's method (its prefix), empty when it is not here."""
    from mmgen.inference.pipeline import GenerationOptions

    return [f.name for f in dataclasses.fields(GenerationOptions) if f.name.startswith(PREFIXES[section])]


def missing(sections: list[str]) -> str | None:
    """Why a section cannot run here (None: it can)."""
    absent = [s for s in sections if not method_options(s)]
    if not absent:
        return None
    return "; ".join(f"GenerationOptions has no {PREFIXES[s]}* options ({WHAT[s]} is not in this checkout)"
                     for s in absent)


# -- the report -------------------------------------------------------------------------------------
def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def substrate_text(results: dict) -> str:
    subs, base = results.get("substrate", {}), results.get("baseline", {})
    if not subs:
        return "The substrate has not been trained yet."
    lines = []
    for variant, f in subs.items():
        m = f["model"]
        how = (f"the discrete substrate with a projector aligned on its frozen decoder, reading each picture as "
               f"{m['image_feature_dim']}-d codebook vectors") if m.get("image_feature_dim") else \
            f"hidden {m['hidden']} x {m['layers']} layers"
        stages = "; ".join(f"{st['stage']} {st['steps']} steps in {st['train_seconds'] / 60:.1f} min "
                           f"({st['wall_seconds'] / 60:.1f} min with start-up)" for st in f["stages"])
        lines.append(f"- **{variant}** (`training/{f['recipe']}.yaml`): {how}; {f.get('tokens_per_picture', '?')} tokens "
                     f"a picture; {stages}; OMP_NUM_THREADS={f['threads']}, launcher {f['launcher']}")
    rows = []
    for variant, b in base.items():
        rows.append([variant, _pct(b["t2i"]["val"]["accuracy"]), _pct(b["t2i"]["heldout"]["accuracy"]),
                     _pct(b["t2i"]["val"]["parse_rate"]), _pct(b["t2i_cfg"]["val"]["accuracy"]),
                     _pct(b["qa"]["val"]["accuracy"]), _pct(b["qa"]["heldout"]["accuracy"]),
                     _pct(b["buildup"]["val"]["accuracy"]), _pct(b["buildup"]["val"]["object_recall"])])
    n = next(iter(base.values()))["qa"]["val"]["n"] if base else 0
    cfg = results.get("settings", {}).get("cfg_scale")
    table = md_table(["substrate", "t2i val", "t2i held-out pairs", "t2i parsed", f"t2i val, CFG {cfg}", "QA val",
                      "QA held-out pairs", "build-up val", "build-up object recall"], rows) if rows else ""
    if not base:
        table = "(not evaluated yet: run the `substrate` section)"
    return "\n".join([
        f"Trained from the quick-start run `{next(iter(subs.values()))['run']}` (its DualViTok code shards and tokenizer, "
        "no code-block table), pretraining then the quick start's SFT:", "", *lines, "",
        f"Baseline accuracies ({n} prompts / questions / documents per split; the quick start's sampling: temperature "
        f"{results.get('settings', {}).get('temperature')}, no guidance unless stated):", "", table])


def section_text(results: dict, name: str, title: str, render) -> str:
    r = results.get(name)
    if r is None:
        return f"### {title}\n\nNot run yet."
    if "skipped" in r:
        return f"### {title}\n\nSkipped: {r['skipped']}."
    return f"### {title}\n\n{render(r)}"


def report(results: dict) -> str:
    parts = ["Every method against the plain pipeline on the same checkpoint, the same prompts and seeds, "
             "side by side in one run; speed as ratios (the machine is shared, absolute seconds move).", "",
             "### Substrate", "", substrate_text(results)]
    parts += ["", section_text(results, "prune", "Prefill pruning", lambda r: r.get("text", ""))]
    parts += ["", section_text(results, "spec", "Speculative Jacobi decoding", lambda r: r.get("text", ""))]
    parts += ["", section_text(results, "kv", "KV-cache compression", lambda r: r.get("text", ""))]
    parts += ["", section_text(results, "all", "All at once", lambda r: r.get("text", ""))]
    return "\n".join(parts)


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart", help="a quick-start run directory (its code shards and tokenizer)")
    ap.add_argument("--out", default="runs/inference-substrate", help="where the substrate and the results are kept")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--n", type=int, default=100, help="prompts / questions / documents per split and setting")
    ap.add_argument("--cfg-scale", type=float, default=2.0, help="guidance where a section has it on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the recipe's)")
    ap.add_argument("--align-steps", type=int, default=None, help="the continuous variant's align steps (default: the recipe's)")
    ap.add_argument("--variants", default="discrete,continuous", help="substrate variants to train and use")
    ap.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of the substrate recipes (repeatable)")
    ap.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "none"], help="as the quick start's")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from mmgen.inference.settings import DEFAULT_SAMPLING
    from mmgen.models.bundle import load_bundle

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        raise SystemExit(f"error: unknown section {', '.join(bad)} (use {', '.join(SECTIONS)})")
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results["settings"] = {"n": args.n, "cfg_scale": args.cfg_scale, "seed": args.seed,
                           "temperature": DEFAULT_SAMPLING.temperature}

    def save():
        res_path.write_text(json.dumps(results, indent=1, default=str))

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "continuous" in variants and "discrete" not in variants and "discrete" not in results.get("substrate", {}):
        raise SystemExit("error: the continuous substrate starts from the discrete one: train that first")
    subs = results.setdefault("substrate", {})
    for v in variants:
        init = subs["discrete"]["bundle"] if v == "continuous" else None
        subs[v] = {**subs.get(v, {}), **train_substrate(run, out, v, args.steps if v == "discrete" else args.align_steps,
                                                        args.sft_steps, args.launcher, args.train_override, init)}
        save()
    bundles = {v: load_bundle(subs[v]["bundle"]) for v in variants}
    for v, b in bundles.items():
        subs[v]["tokens_per_picture"] = tokens_per_picture(b)
    if "substrate" in wanted:
        for v, b in bundles.items():
            print(f"[inference] baseline accuracies of the {v} substrate ({args.n} per split) ...", flush=True)
            results.setdefault("baseline", {})[v] = baseline(b, args.n, args.cfg_scale, args.seed)
            save()

    for name in ("prune", "spec", "kv", "all"):
        if name not in wanted:
            continue
        why = missing(["prune", "spec", "kv"] if name == "all" else [name])
        if why:
            print(f"[inference] {name}: skipped: {why}")
            results[name] = {"skipped": why}
        save()

    body = report(results)
    if args.no_write:
        print(body)
    else:
        write_section("inference", "Inference engine on the tiny substrate: pruning, speculative decoding, KV compression",
                      body)


if __name__ == "__main__":
    main()
