"""``mmgen quickstart``: every stage of the life cycle, end to end, on the ``tiny`` preset.

    world -> filter -> CLIP teacher -> image tokenizer (DualViTok) -> code shards -> DeepSpeed pretraining
          -> SFT -> diffusion detokenizer (packed into the final bundle) -> generation -> evaluation

Each stage writes into its own folder under ``out`` and marks itself done (``out/.done/<stage>``), so
a rerun after an interruption continues with the first unfinished stage. The result is
``out/report.json`` and ``out/report.md`` with a PNG grid of prompts and generated images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmgen.errors import MMGenError
from mmgen.eval.provenance import DEFAULT_EVAL_SEED
from mmgen.inference.settings import DEFAULT_SAMPLING
from mmgen.quickstart_report import write_report_markdown


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    # ShapesWorld documents. The LM learns to bind a caption's objects to grid cells only after tens of
    # thousands of caption -> image examples (benchmarks/binding_probe.py), so the world is large and
    # leans to captions; video and speech documents still exercise the filter. 30,000 rather than
    # 10,000 (same recipes, code blocks, 6,000 steps; docs/experiments/2026-12-06-code-blocks.md): after SFT, on 144
    # prompts / 200 questions at temperature 0.4, t2i 0.73 against 0.54, QA 0.93 against 0.85 (~3 min more).
    docs: int = 30000
    mix: str = "caption=0.5,qa=0.2,buildup=0.2,video=0.05,speech=0.05"
    seed: int = 0
    defect_rate: float = 0.1
    workers: int = 2
    tokenizer_recipe: str = "tiny_dualvitok"  # in tokenizers/; tiny_vq: pixel codes only, no CLIP stage
    clip_recipe: str = "tiny_clip"  # in tokenizers/: DualViTok's semantic teacher, trained first
    # DualViTok's second stage (in tokenizers/, e.g. tiny_dualvitok_text; "" skips it): text-aligned semantic
    # codes, trained on the first stage's tokenizer with its pixel encoder and codebook fixed, so the pixel
    # codes are the first stage's exactly. The demo skips it: its LM reads and writes only pixel codes (as
    # code blocks), so the stage changed nothing the chat or the evaluation uses and cost about a fifth of
    # the demo's time (355 s of 28 min). It reads tokenizer_overrides too (the two stages share their
    # architecture), then text_tokenizer_overrides.
    text_tokenizer_recipe: str = ""
    filter_recipe: str = "shapesworld"  # in data_pipelines/
    train_recipe: str = "tiny_pretrain"  # in training/
    sft_recipe: str | None = "tiny_sft"  # in training/; None skips SFT (evaluation then uses the pretrained model)
    # The 1x diffusion detokenizer packed into the final bundle (in tokenizers/; "" skips it): trained for the
    # bundle's image tokenizer and the codes its LM writes (`mmgen train-detokenizer ... bundle=`), so
    # generation, the chat and the evaluation draw pictures through it. 100 steps draw what the tokenizer's
    # decoder draws (100% scene agreement on 64 val prompts, 44.2 dB against its picture; ~0.45 CPU-s a step
    # at one thread, docs/experiments/2026-12-07-detokenizer-in-the-quick-start.md).
    detokenizer_recipe: str = "tiny_detokenizer_quickstart"
    clip_overrides: list[str] = field(default_factory=list)
    tokenizer_overrides: list[str] = field(default_factory=list)
    text_tokenizer_overrides: list[str] = field(default_factory=list)
    train_overrides: list[str] = field(default_factory=list)
    sft_overrides: list[str] = field(default_factory=list)
    detokenizer_overrides: list[str] = field(default_factory=list)
    eval_prompts: int = 200  # per split (val, heldout), for t2i and QA; build-up documents use the val split
    eval_seed: int = DEFAULT_EVAL_SEED
    # mmgen eval run's suites (add geneval for GenEval's six tags); robust: the val prompts again in each
    # surface form people type, seconds of the evaluation stage
    eval_suites: str = "t2i,robust,qa,interleaved,recon"
    # The sampling settings below are the evaluation's and are saved with the final bundle
    # (generation_config.json), so `mmgen generate` and `mmgen chat` start from them; bundles without
    # the file fall back to the same values (mmgen.inference.settings.DEFAULT_SAMPLING).
    cfg_scale: float = DEFAULT_SAMPLING.cfg_scale
    # Chosen on prompts the report does not use (evaluate_t2i prompt_seed=99, build-up seed 1; BENCHMARKS
    # "Code blocks"): t2i 0.76 / 0.84 / 0.88 / 0.88 / 0.89 and build-up 0.57 / 0.68 / 0.71 / 0.74 / 0.72
    # at temperature 1 / 0.7 / 0.4 / 0.2 / greedy. One token decides a cell's object, so sampling noise
    # costs a whole object.
    temperature: float = DEFAULT_SAMPLING.temperature
    # The LM reads and writes one token per 3x3 block of pixel codes (mmgen.tokenizers.blocks): a
    # ShapesWorld cell, so a picture is 9 tokens instead of 81. False: the pixel codes themselves.
    code_blocks: bool = True
    # Label the blocks with what they show and add the blocks of every object the tokenizer can encode,
    # held-out colour-shape pairs included (mmgen.tokenizers.blocks.compose_blocks); the LM recipes keep
    # the labelled rows as sums of attribute vectors (model.block_factors), so it can draw those pairs.
    compose_blocks: bool = True
    launcher: str = "deepspeed"  # deepspeed (training/pretrain.sh) or none (in-process)
    # Where the LM stages read their rows: packed (`mmgen pack` once per stage into OUT/packed_<stage>, then
    # streamed: memory and start-up do not grow with the corpus; training/README.md) or memory (every code
    # shard read and packed in the trainer at start)
    data_source: Literal["memory", "packed"] = "packed"


def train_stage(recipe: str, overrides: list[str], launcher: str = "deepspeed") -> Path:
    """One training stage (pretrain or SFT recipe) through ``training/pretrain.sh``'s DeepSpeed launcher,
    or in this process with ``launcher="none"``; returns its final bundle."""
    if launcher == "deepspeed":
        from mmgen.training.pretrain import launch_pretrain

        return Path(launch_pretrain(recipe, overrides))
    from mmgen.training.trainer import pretrain

    return Path(pretrain(recipe, overrides))


def lm_inputs(run: str | Path, code_blocks: bool | None = None) -> tuple[Path, Path]:
    """The code shards and image tokenizer a quick-start run's LM stages read, found through its stage
    markers: with ``code_blocks`` (None: when the run has a blocks stage) the code-block ones, else the
    image tokenizer's own codes (the second stage's tokenizer when the run has one: its pixel codes are
    the first stage's). A missing stage is a one-line MMGenError. What a retraining of the LM stages alone
    starts from (benchmarks/quality_curve.py, benchmarks/robustness.py, benchmarks/inference.py)."""
    run = Path(run)
    done = run / ".done"
    if code_blocks is None:
        code_blocks = (done / "blocks.json").is_file()
    stages = ("blocks",) if code_blocks else ("tokenizer_text", "tokenizer")
    marker = next((done / f"{s}.json" for s in stages if (done / f"{s}.json").is_file()), None)
    codes = run / "blocks" / "codes" if code_blocks else run / "codes"
    tokenize = done / ("blocks.json" if code_blocks else "tokenize.json")
    if marker is None or not tokenize.is_file():
        raise MMGenError(
            f"{run} has no finished {stages[0]} stage ({'blocks' if code_blocks else 'tokenize'}); "
            f"run `mmgen quickstart --out {run}` until it has"
        )
    tok = Path(json.loads(marker.read_text())["result"])
    if not tok.is_absolute() and not tok.is_dir():  # markers hold paths relative to the run's working dir
        tok = run.parent.parent / tok
    for path, what in ((codes, "code shards"), (tok, "image tokenizer")):
        if not path.is_dir():
            raise MMGenError(f"no {what} at {path}: run `mmgen quickstart --out {run}` first")
    return codes, tok


class _Stages:
    """Runs named stages once each, timing them and leaving a done marker with the stage's result."""

    def __init__(self, out: Path):
        self.out = out
        self.done_dir = out / ".done"
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn):
        marker = self.done_dir / f"{name}.json"
        if marker.is_file():
            saved = json.loads(marker.read_text())
            self.timings[name] = saved["seconds"]
            print(f"[quickstart] {name}: done in an earlier run, skipped")
            return saved["result"]
        print(f"[quickstart] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        marker.write_text(json.dumps({"seconds": seconds, "result": result}, default=str))
        print(f"[quickstart] {name}: {seconds:.0f}s", flush=True)
        return result


def _defect_scores(world_dir: Path, filter_dir: Path) -> dict:
    """Precision/recall of the filter per ShapesWorld defect type against labels.jsonl."""
    from mmgen.data.pipeline import score_against_labels

    return score_against_labels(filter_dir, world_dir / "labels.jsonl")


def quickstart(cfg: QuickstartConfig) -> Path:
    from mmgen.config import load_config
    from mmgen.inference.settings import SamplingSettings, save_generation_config
    from mmgen.paths import recipe_path
    from mmgen.tokenizers.train import train_tokenizer
    from mmgen.tokenizers.train_config import TokenizerTrainConfig
    from mmgen.utils.files import read_json

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out)
    t_start = time.perf_counter()

    def world():
        from mmgen.world import render_side, write_world

        # Pictures at a whole multiple of the tokenizer's side: its resize then moves every grid cell
        # by whole pixels, so an object gets the same codes in every cell (see render_side).
        return write_world(
            out / "world",
            n_docs=cfg.docs,
            seed=cfg.seed,
            defect_rate=cfg.defect_rate,
            mix=cfg.mix,
            size=render_side(tcfg.resolution),
        )

    def filtering():
        from mmgen.data.pipeline import run_filter

        summary = run_filter(cfg.filter_recipe, str(out / "world" / "*.tar"), out / "filtered", workers=cfg.workers)
        return {k: summary[k] for k in ("input", "kept", "rejected", "quarantined") if k in summary}

    def clip():
        from mmgen.models.clip_train import ClipTrainConfig, train_clip

        ccfg = load_config(
            ClipTrainConfig,
            recipe_path(cfg.clip_recipe, "tokenizers"),
            [f"out_dir={out / 'clip'}", *cfg.clip_overrides],
        )
        return str(train_clip(ccfg))

    def tokenizer():
        # The recipe trains on freshly rendered train-split scenes: the filtered shards also hold val and
        # held-out documents, whose images the tokenizer must not see either.
        overrides = [f"out_dir={out / 'tokenizer'}", *cfg.tokenizer_overrides]
        if tcfg.tokenizer == "dualvitok":
            overrides.insert(1, f"dualvitok.teacher.name={clip_dir}")
        return train_tok(tok_recipe, overrides)

    def tokenizer_text():
        return train_tok(
            recipe_path(cfg.text_tokenizer_recipe, "tokenizers"),
            [
                *cfg.tokenizer_overrides,
                *cfg.text_tokenizer_overrides,
                f"init_from={first_tok}",
                f"dualvitok.teacher.name={clip_dir}",
                f"out_dir={out / 'tokenizer_text'}",
            ],
        )

    def train_tok(recipe: Path, overrides: list[str]) -> str:
        return str(train_tokenizer(load_config(TokenizerTrainConfig, recipe, overrides)))

    def tokenize():
        from mmgen.tokenizers.pretokenize import pretokenize

        return pretokenize(tok_dir, str(out / "filtered" / "shards"), out / "codes")

    def blocks():
        from mmgen.tokenizers.blocks import compose_world_blocks, fit_code_blocks, reblock_code_shards

        # fitted on the train split's codes only: val and held-out pictures stay unseen; the block shards are
        # made from the code shards (what tokenizing the pictures again would write, without decoding them)
        block_tok = fit_code_blocks(tok_dir, out / "codes", out / "blocks" / "tokenizer")
        if cfg.compose_blocks:
            compose_world_blocks(block_tok)
        reblock_code_shards(block_tok, out / "codes", out / "blocks" / "codes")
        return str(block_tok)

    def train(recipe: str, overrides: list[str]) -> str:
        return str(train_stage(recipe, overrides, cfg.launcher))

    def data_for(stage: str, recipe: str, overrides: list[str]) -> list[str]:
        """The stage's overrides, reading packed shards written first when cfg.data_source is packed."""
        if cfg.data_source == "memory":
            return overrides
        from mmgen.training.pack import pack

        packed = out / f"packed_{stage}"
        pack(recipe, overrides, packed, workers=cfg.workers)
        return [*overrides, "data.source=packed", f"data.packed_shards={packed}"]

    def pretrain():
        return train(
            cfg.train_recipe,
            data_for(
                "pretrain",
                cfg.train_recipe,
                [
                    f"data.code_shards={lm_codes}",
                    f"data.image_tokenizer={lm_tok}",
                    f"out_dir={out / 'lm'}",
                    *cfg.train_overrides,
                ],
            ),
        )

    def sft():
        # The SFT recipe's stage is sft: QA documents become chat turns with the loss on the answers.
        return train(
            cfg.sft_recipe,
            data_for(
                "sft",
                cfg.sft_recipe,
                [
                    f"init_from={pretrained}",
                    f"data.code_shards={lm_codes}",
                    f"out_dir={out / 'sft'}",
                    *cfg.sft_overrides,
                ],
            ),
        )

    def detokenizer():
        from mmgen.models.detokenizer_train import DetokenizerTrainConfig, train_detokenizer

        dcfg = load_config(
            DetokenizerTrainConfig,
            recipe_path(cfg.detokenizer_recipe, "tokenizers"),
            [f"bundle={bundle_dir}", f"out_dir={out / 'detokenizer'}", "progress=false", *cfg.detokenizer_overrides],
        )
        train_detokenizer(dcfg)
        return read_json(out / "detokenizer" / "eval.json")

    def evaluate():
        return _evaluate(cfg, out, Path(bundle_dir), Path(tok_dir))

    tok_recipe = recipe_path(cfg.tokenizer_recipe, "tokenizers")
    tcfg = load_config(TokenizerTrainConfig, tok_recipe, list(cfg.tokenizer_overrides))
    stages.run("world", world)
    stages.run("filter", filtering)
    clip_dir = stages.run("clip", clip) if tcfg.tokenizer == "dualvitok" else None
    tok_dir = first_tok = stages.run("tokenizer", tokenizer)
    if tcfg.tokenizer == "dualvitok" and cfg.text_tokenizer_recipe:
        tok_dir = stages.run("tokenizer_text", tokenizer_text)
    stages.run("tokenize", tokenize)
    lm_tok, lm_codes = tok_dir, out / "codes"
    if cfg.code_blocks:
        lm_tok = stages.run("blocks", blocks)
        lm_codes = out / "blocks" / "codes"
    pretrained = stages.run("pretrain", pretrain)
    bundle_dir = stages.run("sft", sft) if cfg.sft_recipe else pretrained
    save_generation_config(bundle_dir, SamplingSettings(temperature=cfg.temperature, cfg_scale=cfg.cfg_scale))
    detok = stages.run("detokenizer", detokenizer) if cfg.detokenizer_recipe else None
    metrics = stages.run("evaluate", evaluate)
    if detok:
        metrics["detokenizer"] = detok

    report = {
        "preset": "tiny",
        "config": cfg.__dict__,
        "checkpoint": bundle_dir,
        "stage_seconds": stages.timings,
        "total_seconds_this_run": time.perf_counter() - t_start,
        **metrics,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    write_report_markdown(report, out / "report.md")
    return out / "report.md"


def _evaluate(cfg: QuickstartConfig, out: Path, bundle_dir: Path, tok_dir: Path) -> dict:
    """``mmgen eval run`` on the final checkpoint with the quick start's settings (``out/eval`` holds its
    report, grids and per-sample results; an interrupted evaluation resumes there)."""
    from mmgen.eval.run import run_eval
    from mmgen.utils.files import read_json

    rep = run_eval(
        bundle_dir,
        cfg.eval_suites,
        out / "eval",
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        cfg_scale=cfg.cfg_scale,
        seed=cfg.eval_seed,
        n=cfg.eval_prompts,
    )
    suites = {name: e["metrics"] for name, e in rep["suites"].items()}
    metrics: dict = {
        "eval_report": str(out / "eval" / "report.json"),
        "checkpoint_sha256": rep["checkpoint"]["sha256"],
        "sampling": rep["sampling"],
        "image_decoding": rep["inference"]["image_decoding"],
    }
    if "t2i" in suites:
        metrics.update(
            t2i_accuracy=suites["t2i"]["val"]["accuracy"],
            t2i_accuracy_heldout_compositions=suites["t2i"]["heldout"]["accuracy"],
            t2i=suites["t2i"],
        )
    if "qa" in suites:
        metrics.update(
            qa_accuracy=suites["qa"]["val"]["accuracy"],
            qa_accuracy_heldout_compositions=suites["qa"]["heldout"]["accuracy"],
            qa=suites["qa"],
        )
    if "interleaved" in suites:
        metrics.update(interleaved_accuracy=suites["interleaved"]["val"]["accuracy"], interleaved=suites["interleaved"])
    if "robust" in suites:
        metrics["robust"] = {**suites["robust"], "examples": rep["suites"]["robust"]["forms"]}
    if "geneval" in suites:
        metrics["geneval"] = suites["geneval"]
    metrics["training"] = read_json(bundle_dir / "mmgen.json", {})
    if "recon" in suites:
        metrics["tokenizer_reconstruction"] = suites["recon"]["tokenizer"]
        if "inner_tokenizer" in suites["recon"]:  # code blocks: the image tokenizer under the table, same scenes
            metrics["inner_tokenizer_reconstruction"] = suites["recon"]["inner_tokenizer"]
        tok = suites["recon"]["tokenizer"]
        metrics["tokenizer"] = {
            "type": tok["type"],
            "tokens_per_image": tok.get("tokens_per_image"),
            "training": read_json(tok_dir.parent / "eval.json"),
            "clip_teacher": read_json(out / "clip" / "eval.json"),
        }
    metrics["filter_defects"] = _defect_scores(out / "world", out / "filtered")
    return metrics
