"""``mmgen eval``: evaluation commands, a typer sub-app: ``mmgen eval run`` (suites on a checkpoint, a
report with intervals), ``mmgen eval compare`` (two reports side by side), ``mmgen eval geneval-prompts``
(ShapesWorld's GenEval metadata), ``mmgen eval lmms-task`` (the lmms-eval task files) and
``mmgen eval scene`` (the scene parser on image files)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mmgen.world.surface import SURFACE_FORMS

eval_app = typer.Typer(
    help="Evaluation: the ShapesWorld scene parser and benchmark suites.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@eval_app.command("scene")
def scene(
    images: list[Path] = typer.Argument(..., help="Image files to parse."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image instead of a line."),
):
    """Parse ShapesWorld images into scenes (shape, colour, size, cell); 'unparseable' with a reason otherwise.

    Example: mmgen eval scene out/sample_0.png out/sample_1.png --json
    """
    from PIL import Image, UnidentifiedImageError

    from mmgen.errors import MMGenError
    from mmgen.world.scene_parser import parse_scene_report

    for path in images:
        if not path.is_file():
            raise MMGenError(f"image not found: {path} (give paths to image files)")
        try:
            with Image.open(path) as img:
                res = parse_scene_report(img)
        except (UnidentifiedImageError, OSError) as e:
            raise MMGenError(f"cannot read image {path}: {e}") from None
        if as_json:
            typer.echo(json.dumps({"image": str(path), **res.to_dict()}))
        elif res.scene is None:
            typer.echo(f"{path}: unparseable ({res.reason})")
        else:
            from mmgen.world.text import caption

            typer.echo(f"{path}: {caption(res.scene, template=0)}")


@eval_app.command("run")
def run(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (an mmgen bundle)."),
    suite: str = typer.Option(
        "all", "--suite", help="Comma list of t2i, robust, geneval, qa, interleaved, recon; or all."
    ),
    out: Path = typer.Option(
        Path("eval"), "--out", help="Folder for report.json, report.md, grids and per-sample results."
    ),
    n: int = typer.Option(200, "--n", help="Prompts / questions / documents per split (t2i, qa, interleaved)."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed (default: the quick start's, 0)."),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Default: generation_config.json, else the quick start's 0.2."
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="Default: generation_config.json, else 0 (off)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Default: generation_config.json, else 1 (off)."),
    cfg_scale: float | None = typer.Option(
        None, "--cfg-scale", help="Default: generation_config.json's guidance_scale, else 1 (off)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per batch (batch i samples with seed + i)."),
    geneval_prompts: Path | None = typer.Option(
        None, "--geneval-prompts", help="GenEval metadata jsonl (default: ShapesWorld's)."
    ),
    geneval_per_tag: int = typer.Option(25, "--geneval-per-tag", help="ShapesWorld GenEval prompts per tag."),
    detector: str = typer.Option(
        "scene_parser",
        "--detector",
        help="scene_parser, or a local directory of a zero-shot "
        "detector (OWL-ViT, OWLv2, Grounding DINO) for "
        "real images.",
    ),
    continuation: int = typer.Option(
        0,
        "--continuation",
        help="Build-up documents the model continues itself (writes the next instruction, then draws it).",
    ),
    forms: str = typer.Option(
        ",".join(SURFACE_FORMS),
        "--forms",
        help="The robust suite's surface forms, a comma list of " + ", ".join(SURFACE_FORMS) + ".",
    ),
    robust_split: str = typer.Option(
        "val", "--robust-split", help="Whose t2i prompts the robust suite rewrites: val or heldout."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    detokenizer: str | None = typer.Option(
        None,
        "--detokenizer",
        help="Draw pictures with this diffusion detokenizer "
        "(a pipeline directory, or a folder of x1/ x2/); none: the image "
        "tokenizer's decoder. Default: the checkpoint's detokenizer/ when it "
        "has one.",
    ),
    detok_steps: int | None = typer.Option(None, "--detok-steps", help="Detokenizer denoising steps (default 4)."),
    detok_cfg_scale: float | None = typer.Option(None, "--detok-cfg-scale", help="Detokenizer guidance (1 = off)."),
    detok_scale: int | None = typer.Option(None, "--detok-scale", help="2: the 2x super-resolution detokenizer."),
    detok_scheduler: str | None = typer.Option(
        None, "--detok-scheduler", help="ddim, dpm or ddpm instead of the detokenizer's saved sampler."
    ),
):
    """Evaluate a checkpoint: generate, judge, and write report.json / report.md with PNG grids; every number
    with its count and 95% interval, and what reproduces it. A rerun into the same --out resumes.
    Pictures are drawn as mmgen generate draws them: by the checkpoint's detokenizer when it has one.

    \b
    Example:
        mmgen eval run runs/quickstart/sft/final --suite t2i,geneval,qa --out runs/eval_sft
        mmgen eval run runs/quickstart/sft/final --suite all --temperature 0 --out runs/eval_greedy
        mmgen eval run runs/quickstart/sft/final --suite robust --forms as_written,lower_first,no_period \\
          --out runs/eval_robust
        mmgen eval run runs/quickstart/sft/final --suite t2i --detokenizer none --out runs/eval_vq_decoder
    """
    from mmgen.eval.run import run_eval

    detok = {
        "detok_path": detokenizer,
        "detok_steps": detok_steps,
        "detok_cfg_scale": detok_cfg_scale,
        "detok_scale": detok_scale,
        "detok_scheduler": detok_scheduler,
    }
    report = run_eval(
        checkpoint,
        suite,
        out,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cfg_scale=cfg_scale,
        seed=seed,
        device=device,
        n=n,
        batch_size=batch_size,
        geneval_per_tag=geneval_per_tag,
        geneval_prompts=str(geneval_prompts) if geneval_prompts else None,
        detector=detector,
        continuation_n=continuation,
        robust_forms=forms,
        robust_split=robust_split,
        detok={k: v for k, v in detok.items() if v is not None},
    )
    typer.echo(f"wrote {out / 'report.md'} ({', '.join(report['suites'])})")


@eval_app.command("compare")
def compare(
    a: Path = typer.Argument(..., help="report.json of the first run (A)."),
    b: Path = typer.Argument(..., help="report.json of the second run (B)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
):
    """Print every metric of two reports with its interval, B - A with its 95% interval, and the settings
    that differ.

    Example: mmgen eval compare runs/eval_a/report.json runs/eval_b/report.json
    """
    from mmgen.eval.run import compare_reports, format_comparison

    cmp = compare_reports(a, b)
    typer.echo(json.dumps(cmp, indent=1) if as_json else format_comparison(cmp))


@eval_app.command("geneval-prompts")
def geneval_prompts_cmd(
    out: Path = typer.Option(Path("geneval_metadata.jsonl"), "--out", help="Where to write the metadata jsonl."),
    per_tag: int = typer.Option(25, "--per-tag", help="Prompts per tag."),
    seed: int = typer.Option(1234, "--seed", help="Draws the scenes."),
):
    """Write ShapesWorld's GenEval metadata (GenEval's evaluation_metadata.jsonl format).

    Example: mmgen eval geneval-prompts --out prompts.jsonl --per-tag 50
    """
    from mmgen.eval.geneval import shapesworld_metadata, write_metadata

    p = write_metadata(shapesworld_metadata(per_tag, seed=seed), out)
    typer.echo(f"wrote {p}")


@eval_app.command("lmms-task")
def lmms_task_cmd(
    out: Path = typer.Option(
        Path("lmms_tasks"), "--out", help="Folder for the dataset and the task YAML (--include_path)."
    ),
    n: int = typer.Option(200, "--n", help="Questions per split (val, heldout)."),
    seed: int = typer.Option(0, "--seed", help="Draws the scenes and questions (the qa suite's seed)."),
):
    """Write ShapesWorld QA as an lmms-eval task over a local dataset (needs mmgen[lmms]).

    \b
    Example:
        mmgen eval lmms-task --out lmms_tasks --n 200
        lmms-eval --model mmgen --model_args pretrained=runs/quickstart/sft/final \\
            --tasks shapesworld_qa --include_path lmms_tasks --output_path lmms_out
    """
    from mmgen.eval.lmms_task import write_qa_task

    typer.echo(f"wrote {write_qa_task(out, n=n, seed=seed)}")


@eval_app.command("judge")
def judge_cmd(
    run_dir: Path = typer.Argument(..., help="An mmgen eval run folder with the interleaved suite."),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."
    ),
    model: str = typer.Option("gpt-4o", "--model", help="Model name sent to the endpoint."),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the endpoint's key."
    ),
    local: Path | None = typer.Option(None, "--local", help="Local directory of a transformers vision-language model."),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="Folder of <aspect>.txt judge prompts (default: eval/judge_prompts)."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Judge only the first N steps."),
):
    """Ask a model judge InterleavedEval's five questions about the interleaved steps of a run, and write
    how far its verdicts agree with the exact ShapesWorld rules (judge_agreement.json).

    \b
    Example:
        mmgen eval judge runs/eval_sft --endpoint http://127.0.0.1:8000/v1 --model Qwen2-VL-7B-Instruct
        mmgen eval judge runs/eval_sft --local models/smolvlm --limit 50
    """
    import os

    from mmgen.errors import MMGenError
    from mmgen.eval.judges import EndpointJudge, LocalJudge, agreement

    if bool(endpoint) == bool(local):
        raise MMGenError("give exactly one judge: --endpoint URL or --local DIR")
    judge = (
        EndpointJudge(endpoint, model, api_key=os.environ.get(api_key_env), prompts_dir=prompts)
        if endpoint
        else LocalJudge(local, prompts_dir=prompts)
    )
    res = agreement(run_dir, judge, limit=limit)
    for aspect, m in res["aspects"].items():
        a = m["agreement"]
        typer.echo(
            f"{aspect:22s} agreement {a['value'] if a['value'] is not None else float('nan'):.2f} "
            f"[{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] n={a['n']} kappa {m['kappa']}"
        )


@eval_app.command("lmms", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lmms_cmd(ctx: typer.Context):
    """Run lmms-eval's command line with mmgen's torchvision shim applied first (needs mmgen[lmms]).

    \b
    Example:
        mmgen eval lmms eval --model mmgen --model_args pretrained=runs/quickstart/sft/final \\
            --tasks shapesworld_qa --include_path lmms_tasks --output_path lmms_out
    """
    from mmgen.errors import MMGenError
    from mmgen.eval.lmms_cli import main

    rc = main(list(ctx.args))
    if rc:
        raise MMGenError(f"lmms-eval exited with status {rc}")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
