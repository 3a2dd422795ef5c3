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

- ``prune``: prefill FLOPs (analytic, :func:`mmgen.inference.prune.prefill_flops`) and prefill wall time against QA and
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

from mmgen.utils.bench import command_line, md_table, write_section

HERE = Path(__file__).resolve().parent
SECTIONS = ("substrate", "prune", "spec", "kv", "all")
# The substrate's two variants: the recipe each trains with (in training/). The continuous one starts from
# the discrete one's final bundle (a projector aligned on its frozen decoder).
VARIANTS = {"discrete": "inference_substrate", "continuous": "inference_substrate_continuous"}
KEEP_RATIOS = (0.75, 0.5, 0.25, 0.1)
# Below this baseline accuracy a task cannot show the goals' losses of 1-2 points against its own noise
# (100 per split: a 95% interval of about +-10 points at 50%), so the report marks it.
WEAK_BASELINE = 0.5
PREFIXES = {"prune": "prune_", "spec": "spec_", "kv": "kv_"}
WHAT = {"prune": "prefill pruning", "spec": "speculative Jacobi decoding", "kv": "KV-cache compression"}


# -- the substrate ----------------------------------------------------------------------------------
def _stage_facts(bundle_dir: Path, wall: float) -> dict:
    meta = json.loads((Path(bundle_dir) / "mmgen.json").read_text())
    t = meta["train"]
    return {
        "stage": meta["stage"],
        "steps": t["steps"],
        "train_seconds": t["train_seconds"],
        "wall_seconds": wall,
        "loss": (t.get("last_logged") or {}).get("loss", t.get("final_loss")),
        "tokens_per_s": t.get("tokens_per_s"),
    }


def train_substrate(
    run: Path,
    out: Path,
    variant: str,
    steps: int | None,
    sft_steps: int | None,
    launcher: str,
    overrides: list[str] = (),
    init_from: str | None = None,
) -> dict:
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
    over = [
        f"data.code_shards={codes}",
        f"data.image_tokenizer={tok}",
        f"out_dir={out / variant / 'lm'}",
        *([f"steps={steps}"] if steps else []),
        *([f"init_from={init_from}"] if init_from else []),
        *overrides,
    ]
    stages = []
    t0 = time.perf_counter()
    final = train_stage(VARIANTS[variant], over, launcher)
    stages.append(_stage_facts(final, time.perf_counter() - t0))
    if variant == "discrete":
        # Rows of 1024 tokens (the pretraining's) rather than the SFT recipe's 512, at the same tokens per
        # step: a build-up document of five 96-token pictures does not fit 512 and would be cut between them.
        sft_over = [
            f"init_from={final}",
            f"data.code_shards={codes}",
            f"out_dir={out / variant / 'sft'}",
            "data.seq_len=1024",
            "micro_batch=2",
            *([f"steps={sft_steps}"] if sft_steps else []),
        ]
        t1 = time.perf_counter()
        final = train_stage(q.sft_recipe, sft_over, launcher)
        stages.append(_stage_facts(final, time.perf_counter() - t1))
    save_generation_config(final, SamplingSettings(temperature=q.temperature, cfg_scale=q.cfg_scale))
    c = json.loads(
        (Path(final) / "config.json").read_text()
    )  # the model as built, whatever the last stage's recipe says
    t = c["text_config"]
    facts = {
        "variant": variant,
        "recipe": VARIANTS[variant],
        "bundle": str(final),
        "run": str(run),
        "code_shards": str(codes),
        "image_tokenizer": str(tok),
        "launcher": launcher,
        "stages": stages,
        "model": {
            "hidden": t["hidden_size"],
            "layers": t["num_hidden_layers"],
            "heads": t["num_attention_heads"],
            "image_feature_dim": c.get("image_feature_dim"),
        },
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "init_from": init_from,
    }
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


# -- measuring one setting ------------------------------------------------------------------------------
class Probe:
    """What a generation costs, measured the same way whatever the method: hooks on the model count its
    forward calls and time each generation call (from its first forward to its last, on one cache: image
    decoding and judging left out), in wall seconds and in this process's CPU seconds (which other work
    on a shared machine disturbs less), and read the bytes its cache holds when the call ends (and the
    peak, where the cache keeps one)."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self._cache, self._call = None, None
        self._hooks = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        cache = kwargs.get("cache")
        cache = kwargs.get("past_key_values") if cache is None else cache
        # A generation call starts on an empty cache. (A pruned prefill runs on a scratch cache and hands
        # the kept entries to the call's own, which the steps then fill: one call, its last cache held.)
        if self._call is None or cache is None or cache.get_seq_length() == 0:
            self._close()
            x = kwargs.get("input_ids")
            x = kwargs.get("inputs_embeds") if x is None else x
            self._call = {
                "forwards": 0,
                "rows": int(x.shape[0]),
                "start": time.perf_counter(),
                "cpu_start": time.process_time(),
            }
        self._cache = cache
        self._call["forwards"] += 1

    def _post(self, module, args, kwargs, out):
        self._call["end"], self._call["cpu_end"] = time.perf_counter(), time.process_time()

    def _close(self):
        if self._call is None:
            return
        from mmgen.inference.pipeline import cache_bytes

        c, held = self._call, self._cache
        c["seconds"] = c.pop("end", c["start"]) - c.pop("start")
        c["cpu_seconds"] = c.pop("cpu_end", c["cpu_start"]) - c.pop("cpu_start")
        if held is not None:
            stats = _kv_stats(held)
            c["bytes"], c["bytes_peak"] = stats.get("bytes", cache_bytes(held)), stats.get("bytes_peak")
        self.calls.append(c)
        self._cache, self._call = None, None

    def finish(self) -> list[dict]:
        self._close()
        for h in self._hooks:
            h.remove()
        return self.calls


def _kv_stats(cache) -> dict:
    try:
        from mmgen.inference.kv_cache import kv_stats
    except ImportError:
        return {}
    return kv_stats(cache)


TASKS = {
    "t2i": "text-to-image (val)",
    "qa": "visual QA (val)",
    "buildup": "build-up next image (val)",
    "buildup4": "build-up, documents of >= 4 pictures (val)",
}


def evaluate(bundle, task: str, n: int, seed: int, options: dict | None = None, cfg_scale: float | None = None) -> dict:
    """Accuracy of one task with mmgen's evaluation functions (val split), generation through
    ``GenerationOptions(**options)``, and what the probe saw: forward passes and seconds per generation
    call, KV bytes per document at the end of each call (a guided document's two rows together)."""
    from mmgen.eval.t2i import evaluate_t2i
    from mmgen.eval.understanding import evaluate_interleaved, evaluate_qa
    from mmgen.inference.pipeline import GenerationOptions

    o = GenerationOptions(**options) if options else None
    probe = Probe(bundle.model)
    t0 = time.perf_counter()
    try:
        if task == "t2i":
            r = evaluate_t2i(bundle, n=n, seed=seed, cfg_scale=cfg_scale, splits=("val",), options=o)
        elif task == "qa":
            r = evaluate_qa(bundle, n=n, seed=seed, splits=("val",), options=o)
        else:
            r = evaluate_interleaved(
                bundle, n=n, seed=seed, cfg_scale=cfg_scale, options=o, min_images=4 if task == "buildup4" else 0
            )
    finally:
        calls = probe.finish()
    wall = time.perf_counter() - t0
    m = r["splits"]["val"]
    guided = (cfg_scale or 1.0) != 1.0 and task != "qa"
    docs = [c["rows"] // (2 if guided else 1) for c in calls]
    out = {
        "task": task,
        "options": options or {},
        "cfg_scale": cfg_scale,
        "n": m["n"],
        "accuracy": m["accuracy"],
        "calls": len(calls),
        "forwards": sum(c["forwards"] for c in calls),
        "forwards_per_call": sum(c["forwards"] for c in calls) / max(1, len(calls)),
        "generation_seconds": sum(c["seconds"] for c in calls),
        "wall_seconds": wall,
        "generation_cpu_seconds": sum(c["cpu_seconds"] for c in calls),
        "bytes_per_doc": sum(c.get("bytes", 0) for c in calls) / max(1, sum(docs)),
    }
    peaks = [c.get("bytes_peak") for c in calls]
    if all(p is not None for p in peaks) and peaks:
        out["peak_bytes_per_doc"] = sum(peaks) / max(1, sum(docs))
    if "parse_rate" in m:
        out["parse_rate"] = m["parse_rate"]
    print(
        f"[inference]   {task} {options or 'plain'}: accuracy {out['accuracy']:.3f}, {out['forwards_per_call']:.1f} "
        f"forwards/call, {out['generation_seconds']:.1f} s generating, {out['bytes_per_doc'] / 1024:.0f} KiB/doc",
        flush=True,
    )
    return out


def plain_twice(bundle, task, n, seed, cfg_scale, run) -> dict:
    """The plain pipeline measured before and after a sweep (``run``), its seconds the mean of the two
    (the spread says how much the shared machine moved meanwhile)."""
    first = evaluate(bundle, task, n, seed, None, cfg_scale)
    results = run()
    second = evaluate(bundle, task, n, seed, None, cfg_scale)
    plain = dict(first)
    for k in ("generation_seconds", "generation_cpu_seconds"):
        plain[k] = (first[k] + second[k]) / 2
    plain["seconds_spread"] = abs(first["generation_seconds"] - second["generation_seconds"]) / max(
        plain["generation_seconds"], 1e-9
    )
    plain["accuracy_second"] = second["accuracy"]
    return {"plain": plain, "runs": results}


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
    return "; ".join(
        f"GenerationOptions has no {PREFIXES[s]}* options ({WHAT[s]} is not in this checkout)" for s in absent
    )


# -- the sections ----------------------------------------------------------------------------------
def task_rows(bundle, task: str, n: int, seed: int) -> list[list[int]]:
    """The prompt rows the evaluation suite of ``task`` generates from (its own cases and layout)."""
    from mmgen.eval.interleaved_suite import InterleavedSuite
    from mmgen.eval.suite_base import Context, EvalOptions, function_sampling
    from mmgen.eval.suites import QASuite

    suite = QASuite(("val",)) if task == "qa" else InterleavedSuite()
    opts = EvalOptions(n=n, interleaved_min_images=4 if task == "buildup4" else 0)
    suite.prepare(bundle, Context(out=None, sampling=function_sampling(bundle, seed), opts=opts))
    return [c["row"] for _, _, payload in suite.batches for c in payload[-1]]


def prefill_cost(bundle, rows: list[list[int]], options: dict, repeats: int = 3, batch: int = 16) -> dict:
    """Prefill FLOPs (the pruner's analytic count) and wall time of ``rows`` in batches, pruned by
    ``options`` against plain; the two timed alternately ``repeats`` times per batch, the fastest of each kept."""
    from mmgen.inference.pipeline import GenerationOptions
    from mmgen.inference.prune import make_pruner, prefill_only

    pad = bundle.text_tokenizer.pad_token_id or 0
    flops = flops_full = 0
    plain_s = pruned_s = 0.0
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        best = {"plain": float("inf"), "pruned": float("inf")}
        for _ in range(repeats):
            best["plain"] = min(
                best["plain"], prefill_only(bundle.model, bundle.vocab, chunk, None, pad_id=pad)["seconds"]
            )
            r = prefill_only(bundle.model, bundle.vocab, chunk, make_pruner(GenerationOptions(**options)), pad_id=pad)
            best["pruned"] = min(best["pruned"], r["seconds"])
        flops += r["report"]["flops"]
        flops_full += r["report"]["flops_full"]
        plain_s += best["plain"]
        pruned_s += best["pruned"]
    return {
        "flops_ratio": flops / flops_full,
        "flops": flops,
        "flops_full": flops_full,
        "prefill_seconds": pruned_s,
        "prefill_seconds_plain": plain_s,
        "prefill_speedup": plain_s / pruned_s,
    }


def prune_settings(variant: str, only: list[str] | None = None) -> list[dict]:
    """Every pruning method (or those in ``only``) at every keep ratio, the in-LLM ones also ranking at
    layer 1, so that three of the four layers are cut; the continuous substrate gets the methods whose
    route differs there (before the LLM: features merged before the projector) and FastV."""
    from mmgen.inference.prune import IN_LLM, PRUNE_METHODS

    methods = [m for m in PRUNE_METHODS if m != "none" and (not only or m in only)]
    if variant == "continuous":
        methods = [m for m in methods if m not in IN_LLM or m == "fastv"]
    out = []
    for m in methods:
        for layer in (1, 2) if m in ("fastv", "text") else (None,):
            for r in KEEP_RATIOS:
                out.append({"prune_method": m, "prune_ratio": r, **({"prune_layer": layer} if layer else {})})
    return out


def run_prune(bundles: dict, n: int, seed: int, only: list[str] | None = None) -> dict:
    out = {}
    for v, b in bundles.items():
        print(f"[inference] prune: {v} substrate", flush=True)
        rows = {t: task_rows(b, t, n, seed) for t in ("qa", "buildup")}

        plain = {t: evaluate(b, t, n, seed) for t in ("qa", "buildup")}
        runs = [
            {
                "options": o,
                **{t: evaluate(b, t, n, seed, o) for t in ("qa", "buildup")},
                "cost": {t: prefill_cost(b, rows[t], o) for t in ("qa", "buildup")},
            }
            for o in prune_settings(v, only)
        ]
        out[v] = {"plain": plain, "runs": runs}
    return out


def spec_settings() -> list[dict]:
    """Speculative Jacobi decoding at its default window, then the relaxed acceptance's delta sweep."""
    base = {"spec_decoding": True, "spec_window": 16}
    return [base] + [{**base, "spec_delta": d} for d in SPEC_DELTAS]


SPEC_DELTAS = (0.05, 0.1, 0.2, 0.4)


def run_spec(bundles: dict, n: int, seed: int, cfg_scale: float) -> dict:
    out = {}
    for v, b in bundles.items():
        print(f"[inference] spec: {v} substrate, CFG {cfg_scale}", flush=True)
        out[v] = plain_twice(
            b,
            "t2i",
            n,
            seed,
            cfg_scale,
            lambda b=b: [evaluate(b, "t2i", n, seed, o, cfg_scale) for o in spec_settings()],
        )
    return out


KV_BUDGETS = (64, 128, 192)


def kv_settings() -> list[dict]:
    """transformers' fp8 cache alone, each compression method at each budget, and the best-compressing
    mix (h2o in 8-bit)."""
    from mmgen.inference.kv_cache import METHODS

    out = [{"cache": "fp8"}]
    for m in (m for m in METHODS if m != "none"):
        out += [{"kv_method": m, "kv_budget": k} for k in KV_BUDGETS]
    out += [{"kv_method": "h2o", "kv_budget": k, "cache": "fp8"} for k in KV_BUDGETS]
    return out


def run_kv(bundles: dict, n: int, seed: int) -> dict:
    out = {}
    for v, b in bundles.items():
        print(f"[inference] kv: {v} substrate", flush=True)
        out[v] = plain_twice(
            b, "buildup4", n, seed, None, lambda b=b: [evaluate(b, "buildup4", n, seed, o) for o in kv_settings()]
        )
    return out


def run_all(bundles: dict, n: int, seed: int, cfg_scale: float, combo: dict) -> dict:
    out = {}
    for v, b in bundles.items():
        print(f"[inference] all at once: {v} substrate, CFG {cfg_scale}: {combo}", flush=True)
        out[v] = plain_twice(
            b, "buildup4", n, seed, cfg_scale, lambda b=b: [evaluate(b, "buildup4", n, seed, combo, cfg_scale)]
        )
    return out


# -- the report -------------------------------------------------------------------------------------
def _weak(*plain) -> str:
    """What a goal line adds when a plain accuracy it compares against is under WEAK_BASELINE."""
    low = [a for a in plain if a < WEAK_BASELINE]
    return f" Plain accuracy {_pct(min(low))}: too weak to decide the accuracy part (see Substrate)." if low else ""


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def substrate_text(results: dict) -> str:
    subs, base = results.get("substrate", {}), results.get("baseline", {})
    if not subs:
        return "The substrate has not been trained yet."
    lines = []
    for variant, f in subs.items():
        m = f["model"]
        how = (
            (
                f"the discrete substrate with a projector aligned on its frozen decoder, reading each picture as "
                f"{m['image_feature_dim']}-d codebook vectors"
            )
            if m.get("image_feature_dim")
            else f"hidden {m['hidden']} x {m['layers']} layers"
        )
        stages = "; ".join(
            f"{st['stage']} {st['steps']} steps in {st['train_seconds'] / 60:.1f} min "
            f"({st['wall_seconds'] / 60:.1f} min with start-up)"
            for st in f["stages"]
        )
        lines.append(
            f"- **{variant}** (`training/{f['recipe']}.yaml`): {how}; {f.get('tokens_per_picture', '?')} tokens "
            f"a picture; {stages}; OMP_NUM_THREADS={f['threads']}, launcher {f['launcher']}"
        )
    rows = []
    for variant, b in base.items():
        rows.append(
            [
                variant,
                _pct(b["t2i"]["val"]["accuracy"]),
                _pct(b["t2i"]["heldout"]["accuracy"]),
                _pct(b["t2i"]["val"]["parse_rate"]),
                _pct(b["t2i_cfg"]["val"]["accuracy"]),
                _pct(b["qa"]["val"]["accuracy"]),
                _pct(b["qa"]["heldout"]["accuracy"]),
                _pct(b["buildup"]["val"]["accuracy"]),
                _pct(b["buildup"]["val"]["object_recall"]),
            ]
        )
    n = next(iter(base.values()))["qa"]["val"]["n"] if base else 0
    cfg = results.get("settings", {}).get("cfg_scale")
    table = (
        md_table(
            [
                "substrate",
                "t2i val",
                "t2i held-out pairs",
                "t2i parsed",
                f"t2i val, CFG {cfg}",
                "QA val",
                "QA held-out pairs",
                "build-up val",
                "build-up object recall",
            ],
            rows,
        )
        if rows
        else ""
    )
    if not base:
        table = "(not evaluated yet: run the `substrate` section)"
    weak = [
        f"{variant} {task} {_pct(acc)}"
        for variant, b in base.items()
        for task, acc in (
            ("t2i", b["t2i"]["val"]["accuracy"]),
            ("QA", b["qa"]["val"]["accuracy"]),
            ("build-up", b["buildup"]["val"]["accuracy"]),
        )
        if acc < WEAK_BASELINE
    ]
    if weak:
        table += (
            f"\n\n**Too weak to test the accuracy goals on:** {', '.join(weak)} (under "
            f"{_pct(WEAK_BASELINE)}). A task this far from solved cannot show a loss of 1-2 points, and a method "
            "that keeps its accuracy there may only show that the model barely uses the picture (compare a low "
            "keep ratio with the random baseline). The cost columns (FLOPs, forward passes, bytes, seconds) hold; "
            "the accuracy columns of these tasks do not decide the goals. A longer-trained substrate (`--steps`) "
            "is needed for that."
        )
    return "\n".join(
        [
            f"Trained from the quick-start run `{next(iter(subs.values()))['run']}` (its DualViTok code shards and "
            "tokenizer, no code-block table), pretraining then the quick start's SFT:",
            "",
            *lines,
            "",
            f"Baseline accuracies ({n} prompts / questions / documents per split; the quick start's sampling: "
            f"temperature {results.get('settings', {}).get('temperature')}, no guidance unless stated):",
            "",
            table,
        ]
    )


def section_text(results: dict, name: str, title: str, render) -> str:
    r = results.get(name)
    if r is None:
        return f"### {title}\n\nNot run yet."
    if "skipped" in r:
        return f"### {title}\n\nSkipped: {r['skipped']}."
    cmd = results.get("commands", {}).get(name)
    how = f"Measured by `{cmd}`.\n\n" if cmd else ""
    return f"### {title}\n\n{how}{render(r)}"


def _pts(x: float, base: float) -> str:
    return f"{100 * (x - base):+.1f}"


def _opts(o: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in o.items()) or "plain"


def prune_text(r: dict) -> str:
    parts = [
        "Prefill FLOPs are the pruner's analytic count (matrix products, 2 per multiply-add; the merge's "
        "similarity products included) summed over the prompts, as a share of the same prompts' plain prefill; "
        "prefill speed-up is plain / pruned wall time of the prefill alone (batches of 16, the faster of 3 "
        "alternating runs each). Accuracy change in points against the plain pipeline on the same prompts.",
        "",
    ]
    for v, d in r.items():
        p = d["plain"]
        rows = []
        for x in d["runs"]:
            o, c = x["options"], x["cost"]
            rows.append(
                [
                    o["prune_method"],
                    o.get("prune_layer", "-"),
                    o["prune_ratio"],
                    f"{100 * c['qa']['flops_ratio']:.0f}%",
                    f"{100 * c['buildup']['flops_ratio']:.0f}%",
                    f"{c['qa']['prefill_speedup']:.2f}x",
                    f"{c['buildup']['prefill_speedup']:.2f}x",
                    f"{x['qa']['accuracy']:.3f} ({_pts(x['qa']['accuracy'], p['qa']['accuracy'])})",
                    f"{x['buildup']['accuracy']:.3f} ({_pts(x['buildup']['accuracy'], p['buildup']['accuracy'])})",
                ]
            )
        ok = [
            x
            for x in d["runs"]
            if 1 - x["cost"]["qa"]["flops_ratio"] >= 0.6
            and 1 - x["cost"]["buildup"]["flops_ratio"] >= 0.6
            and x["qa"]["accuracy"] >= p["qa"]["accuracy"] - 0.01
            and x["buildup"]["accuracy"] >= p["buildup"]["accuracy"] - 0.01
        ]
        goal = (
            (
                "Goal (>= 60% fewer prefill FLOPs at <= 1 point loss on both): met by "
                + "; ".join(
                    f"{_opts(x['options'])} ({100 * (1 - x['cost']['qa']['flops_ratio']):.0f}% / "
                    f"{100 * (1 - x['cost']['buildup']['flops_ratio']):.0f}% fewer, prefill "
                    f"{x['cost']['qa']['prefill_speedup']:.2f}x / {x['cost']['buildup']['prefill_speedup']:.2f}x "
                    "faster)"
                    for x in ok
                )
            )
            if ok
            else "Goal (>= 60% fewer prefill FLOPs at <= 1 point loss on both QA and build-up): not met by any setting."
        )
        goal += _weak(p["qa"]["accuracy"], p["buildup"]["accuracy"])
        parts += [
            f"**{v} substrate** -- plain: QA {p['qa']['accuracy']:.3f}, build-up {p['buildup']['accuracy']:.3f} "
            f"({p['qa']['n']} questions / documents).",
            "",
            md_table(
                [
                    "method",
                    "layer K",
                    "keep",
                    "FLOPs QA",
                    "FLOPs build-up",
                    "prefill speed-up QA",
                    "prefill speed-up build-up",
                    "QA (pts)",
                    "build-up (pts)",
                ],
                rows,
            ),
            "",
            goal,
            "",
        ]
    parts.append("Plot: `benchmarks/inference_prune.png`.")
    return "\n".join(parts)


def _speed_rows(d: dict, extra) -> tuple[list, dict]:
    p = d["plain"]
    rows = [
        ["plain", f"{p['forwards_per_call']:.1f}", "1.00x", "1.00x", "1.00x", f"{p['accuracy']:.3f}", "", *extra(p, p)]
    ]
    for x in d["runs"]:
        rows.append(
            [
                _opts(x["options"]),
                f"{x['forwards_per_call']:.1f}",
                f"{p['forwards_per_call'] / x['forwards_per_call']:.2f}x",
                f"{p['generation_seconds'] / x['generation_seconds']:.2f}x",
                f"{p['generation_cpu_seconds'] / x['generation_cpu_seconds']:.2f}x",
                f"{x['accuracy']:.3f}",
                _pts(x["accuracy"], p["accuracy"]),
                *extra(x, p),
            ]
        )
    return rows, p


def spec_text(r: dict, cfg: float) -> str:
    parts = [
        f"Text-to-image on val prompts with guidance (CFG {cfg}) at the quick start's temperature: forward passes "
        "per image (all pictures of a batch advance together, so per batch), generation time (first to last "
        "forward of each batch; decoding and judging excluded) as plain / method, accuracy by the scene parser.",
        "",
    ]
    for v, d in r.items():
        rows, p = _speed_rows(d, lambda x, p: [])
        ok = [
            x
            for x in d["runs"]
            if p["forwards_per_call"] / x["forwards_per_call"] >= 2.5
            and p["generation_seconds"] / x["generation_seconds"] >= 2
            and abs(x["accuracy"] - p["accuracy"]) <= 0.02
        ]
        parts += [
            f"**{v} substrate** ({p['n']} prompts; the plain run's time is the mean of one before and one after "
            f"the methods, {100 * p['seconds_spread']:.0f}% apart)",
            "",
            md_table(
                ["setting", "forwards / picture", "fewer passes", "wall speed-up", "CPU speed-up", "t2i", "pts"], rows
            ),
            "",
            (
                "Goal (>= 2.5x fewer passes, >= 2x wall time, <= 2 points change): met by "
                + "; ".join(_opts(x["options"]) for x in ok)
                + "."
            )
            if ok
            else "Goal (>= 2.5x fewer passes, >= 2x wall time, <= 2 points change): not met.",
            "",
        ]
        parts[-2] += _weak(p["accuracy"])
    parts.append("Plot: `benchmarks/inference_spec.png`.")
    return "\n".join(parts)


def kv_text(r: dict) -> str:
    parts = [
        "Build-up documents of at least 4 pictures, cut before the last (the model reads 3-4 pictures, 96 tokens "
        "each, and their instructions, then draws the next): KV bytes per document held when its picture is done "
        "(the tensors the cache layers hold, measured), the peak where the cache records one, and accuracy.",
        "",
    ]

    def extra(x, p):
        peak = x.get("peak_bytes_per_doc")
        return [
            f"{x['bytes_per_doc'] / 1024:.0f}",
            f"{p['bytes_per_doc'] / x['bytes_per_doc']:.2f}x",
            f"{peak / 1024:.0f}" if peak else "-",
        ]

    for v, d in r.items():
        rows, p = _speed_rows(d, extra)
        ok = [
            x
            for x in d["runs"]
            if p["bytes_per_doc"] / x["bytes_per_doc"] >= 5 and x["accuracy"] >= p["accuracy"] - 0.01
        ]
        parts += [
            f"**{v} substrate** ({p['n']} documents)",
            "",
            md_table(
                [
                    "setting",
                    "forwards / picture",
                    "fewer passes",
                    "wall speed-up",
                    "CPU speed-up",
                    "build-up",
                    "pts",
                    "KiB held / doc",
                    "fewer bytes",
                    "peak KiB / doc",
                ],
                rows,
            ),
            "",
            (
                "Goal (>= 5x fewer KV bytes at <= 1 point loss): met by "
                + "; ".join(_opts(x["options"]) for x in ok)
                + "."
            )
            if ok
            else "Goal (>= 5x fewer KV bytes at <= 1 point loss): not met.",
            "",
        ]
        parts[-2] += _weak(p["accuracy"])
    parts.append("Plot: `benchmarks/inference_kv.png`.")
    return "\n".join(parts)


def all_text(r: dict, cfg: float) -> str:
    parts = [
        f"Pruning + KV compression + speculative decoding together, guidance on (CFG {cfg}), on the build-up "
        "documents of at least 4 pictures: end-to-end generation time and accuracy.",
        "",
    ]
    for v, d in r.items():
        rows, p = _speed_rows(d, lambda x, p: [f"{x['bytes_per_doc'] / 1024:.0f}"])
        ok = [
            x
            for x in d["runs"]
            if p["generation_seconds"] / x["generation_seconds"] >= 3 and x["accuracy"] >= p["accuracy"] - 0.02
        ]
        parts += [
            f"**{v} substrate** ({p['n']} documents)",
            "",
            md_table(
                [
                    "setting",
                    "forwards / picture",
                    "fewer passes",
                    "wall speed-up",
                    "CPU speed-up",
                    "build-up",
                    "pts",
                    "KiB held / doc",
                ],
                rows,
            ),
            "",
            "Goal (>= 3x end-to-end at <= 2 points loss): " + ("met." if ok else "not met."),
            "",
        ]
        parts[-2] += _weak(p["accuracy"])
    return "\n".join(parts)


def report(results: dict) -> str:
    cfg = results.get("settings", {}).get("cfg_scale")
    parts = [
        "Every method against the plain pipeline on the same checkpoint, the same prompts and seeds, "
        "side by side in one run; speed as ratios (the machine is shared, absolute seconds move).",
        "",
        "### Substrate",
        "",
        substrate_text(results),
    ]
    parts += ["", section_text(results, "prune", "Prefill pruning", prune_text)]
    parts += ["", section_text(results, "spec", "Speculative Jacobi decoding", lambda r: spec_text(r, cfg))]
    parts += ["", section_text(results, "kv", "KV-cache compression", kv_text)]
    parts += ["", section_text(results, "all", "All at once", lambda r: all_text(r, cfg))]
    return "\n".join(parts)


# The all-at-once setting: one of each method, chosen from their own sections' results.
ALL_AT_ONCE = "prune_method=merge,prune_ratio=0.5,kv_method=h2o,kv_budget=128,spec_decoding=true,spec_window=16"


def parse_options(pairs: dict) -> dict:
    """``key=value`` strings typed as GenerationOptions' fields (mmgen's config loader: an unknown key is an
    error naming the closest)."""
    from mmgen.config import load_config
    from mmgen.inference.pipeline import GenerationOptions

    o = load_config(GenerationOptions, None, [f"{k}={v}" for k, v in pairs.items()])
    return {k: getattr(o, k) for k in pairs}


# -- plots -----------------------------------------------------------------------------------------
def plot(results: dict, where: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    r = results.get("prune")
    if r and "skipped" not in r:
        fig, axes = plt.subplots(len(r), 2, figsize=(10, 4 * len(r)), dpi=100, squeeze=False)
        for row, (v, d) in enumerate(r.items()):
            for col, task in enumerate(("qa", "buildup")):
                ax = axes[row][col]
                groups: dict = {}
                for x in d["runs"]:
                    o = x["options"]
                    key = o["prune_method"] + (f" K={o['prune_layer']}" if "prune_layer" in o else "")
                    groups.setdefault(key, []).append((x["cost"][task]["flops_ratio"], x[task]["accuracy"]))
                for i, (key, pts) in enumerate(sorted(groups.items())):
                    pts.sort()
                    base = key.split()[0] in ("random", "stride")
                    ax.plot(
                        [a for a, _ in pts],
                        [b for _, b in pts],
                        ":" if base else "-",
                        marker="osD^v<>ph*"[i % 10],
                        label=key,
                    )
                ax.scatter([1.0], [d["plain"][task]["accuracy"]], color="black", zorder=5, label="plain")
                ax.axvline(0.4, color="gray", lw=1, ls="--")
                ax.set_xlabel("prefill FLOPs, share of plain (dashed: the 60% cut)")
                ax.set_ylabel(f"{TASKS[task]} accuracy")
                ax.set_title(f"{v} substrate", fontsize=9)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
        made.append(_save(fig, where / "inference_prune.png"))
    for name, task, xkey, xlabel in (
        ("spec", "t2i", "forwards_per_call", "forward passes per picture"),
        ("kv", "buildup4", "bytes_per_doc", "KV KiB held per document (log)"),
    ):
        r = results.get(name)
        if not r or "skipped" in r:
            continue
        fig, axes = plt.subplots(1, len(r), figsize=(6 * len(r), 4.5), dpi=100, squeeze=False)
        scale = 1024 if xkey == "bytes_per_doc" else 1
        for col, (v, d) in enumerate(r.items()):
            ax = axes[0][col]
            groups: dict = {}
            for x in d["runs"]:
                groups.setdefault(_series(name, x["options"]), []).append(x)
            for i, (key, xs) in enumerate(sorted(groups.items())):
                xs.sort(key=lambda x: x[xkey])
                ax.plot(
                    [x[xkey] / scale for x in xs],
                    [x["accuracy"] for x in xs],
                    "-",
                    marker="osD^v<>ph*"[i % 10],
                    label=key,
                )
                for x in xs:
                    ax.annotate(
                        _point(name, x["options"]),
                        (x[xkey] / scale, x["accuracy"]),
                        fontsize=6,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            p = d["plain"]
            ax.scatter([p[xkey] / scale], [p["accuracy"]], color="black", zorder=5, label="plain")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{TASKS[task]} accuracy")
            if xkey == "bytes_per_doc":
                ax.set_xscale("log")
            ax.set_title(f"{v} substrate", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        made.append(_save(fig, where / f"inference_{name}.png"))
    return made


def _series(section: str, o: dict) -> str:
    """The line a setting belongs to in its section's plot."""
    if section == "spec":
        return f"SJD window {o.get('spec_window')}"
    return o.get("kv_method", "no eviction") + (" + fp8" if o.get("cache") == "fp8" else "")


def _point(section: str, o: dict) -> str:
    """A setting's label on its line."""
    if section == "spec":
        return f"delta {o.get('spec_delta', 0.0)}"
    return str(o["kv_budget"]) if "kv_budget" in o else ""


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"[inference] plot: {path}")
    return path


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run", default="runs/quickstart", help="a quick-start run directory (its code shards and tokenizer)"
    )
    ap.add_argument("--out", default="runs/inference-substrate", help="where the substrate and the results are kept")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--n", type=int, default=100, help="prompts / questions / documents per split and setting")
    ap.add_argument("--cfg-scale", type=float, default=2.0, help="guidance where a section has it on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the recipe's)")
    ap.add_argument(
        "--align-steps", type=int, default=None, help="the continuous variant's align steps (default: the recipe's)"
    )
    ap.add_argument("--variants", default="discrete,continuous", help="substrate variants to train and use")
    ap.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of the substrate recipes (repeatable)",
    )
    ap.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "none"], help="as the quick start's")
    ap.add_argument("--prune-methods", default="", help="comma list of prune methods to sweep (default: all)")
    ap.add_argument(
        "--all-options",
        default=ALL_AT_ONCE,
        help="the GenerationOptions of the all-at-once section, comma-separated key=value",
    )
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    ap.add_argument(
        "--render",
        action="store_true",
        help="rewrite the section and plots from --out/results.json "
        "(the measuring run's command stays), running nothing",
    )
    args = ap.parse_args()
    title = "Inference engine on the tiny substrate: pruning, speculative decoding, KV compression"
    if args.render:
        results = json.loads((Path(args.out) / "results.json").read_text())
        plot(results, HERE)
        write_section("inference", title, report(results), command=results.get("command"))
        return

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
    results["settings"] = {
        "n": args.n,
        "cfg_scale": args.cfg_scale,
        "seed": args.seed,
        "temperature": DEFAULT_SAMPLING.temperature,
    }
    results["command"] = command_line()

    def save():
        res_path.write_text(json.dumps(results, indent=1, default=str))

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "continuous" in variants and "discrete" not in variants and "discrete" not in results.get("substrate", {}):
        raise SystemExit("error: the continuous substrate starts from the discrete one: train that first")
    subs = results.setdefault("substrate", {})
    for v in variants:
        init = subs["discrete"]["bundle"] if v == "continuous" else None
        subs[v] = {
            **subs.get(v, {}),
            **train_substrate(
                run,
                out,
                v,
                args.steps if v == "discrete" else args.align_steps,
                args.sft_steps,
                args.launcher,
                args.train_override,
                init,
            ),
        }
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
        elif name == "prune":
            only = [m for m in args.prune_methods.split(",") if m] or None
            results[name] = run_prune(bundles, args.n, args.seed, only)
        elif name == "spec":
            results[name] = run_spec(bundles, args.n, args.seed, args.cfg_scale)
        elif name == "kv":
            results[name] = run_kv(bundles, args.n, args.seed)
        else:
            combo = dict(o.split("=", 1) for o in args.all_options.split(","))
            results[name] = run_all(bundles, args.n, args.seed, args.cfg_scale, parse_options(combo))
        results.setdefault("commands", {})[name] = command_line()  # sections may come from different runs
        save()
    plot(results, out if args.no_write else HERE)  # a --no-write run leaves benchmarks/ as it was

    body = report(results)
    if args.no_write:
        print(body)
    else:
        write_section("inference", title, body)


if __name__ == "__main__":
    main()
