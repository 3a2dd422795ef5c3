"""``mmgen generate``: interleaved text, images and speech from a trained checkpoint."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint directory (an mmgen bundle)."),
        prompt: str = typer.Option(..., "--prompt", help="The text to continue."),
        out: str = typer.Option("generated", "--out", help="Folder for the images (PNG), speech (WAV) and doc.json."),
        mode: str = typer.Option(
            "auto",
            "--mode",
            help="auto (model decides), t2i (image right after the "
            "prompt), tts (speech right after the prompt) or text "
            "(no images or speech).",
        ),
        allow_audio: bool = typer.Option(
            False,
            "--allow-audio",
            help="Let the model open audio blocks in auto mode (needs a bundle with an audio codec).",
        ),
        max_audio_frames: int | None = typer.Option(
            None, "--max-audio-frames", help="Most code frames per audio block (default: the token budget)."
        ),
        seed: int = typer.Option(0, "--seed", help="Sampling seed: same seed, same output."),
        cfg_scale: float | None = typer.Option(
            None,
            "--cfg-scale",
            help="Classifier-free guidance for media tokens (1 = off). Default: the checkpoint's own setting.",
        ),
        max_new_tokens: int = typer.Option(
            512, "--max-new-tokens", help="Most tokens to generate (cut to what the model's context leaves)."
        ),
        temperature: float | None = typer.Option(
            None, "--temperature", help="Sampling temperature (0 = greedy). Default: the checkpoint's own setting."
        ),
        top_k: int | None = typer.Option(
            None, "--top-k", help="Keep the k most likely tokens (0 = all). Default: the checkpoint's own setting."
        ),
        top_p: float | None = typer.Option(
            None, "--top-p", help="Nucleus sampling mass in (0, 1] (1 = off). Default: the checkpoint's own setting."
        ),
        device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
        picture: str | None = typer.Option(
            None,
            "--picture",
            help="An image file shown to the model before the "
            "prompt: ask about it, or (--mode t2i) say what to draw next.",
        ),
        prune_method: str = typer.Option(
            "none",
            "--prune-method",
            help="Prefill pruning of the picture's tokens: "
            "none, fastv, text, pyramid, merge, or the random / stride baselines.",
        ),
        prune_ratio: float = typer.Option(
            1.0, "--prune-ratio", help="Share of each picture's code tokens kept, in (0, 1]."
        ),
        prune_layer: int = typer.Option(
            2, "--prune-layer", help="fastv/text/pyramid: the layer K from which only the kept tokens go on."
        ),
        prune_schedule: str | None = typer.Option(
            None,
            "--prune-schedule",
            help="pyramid stages as LAYER:RATIO,... (e.g. 1:0.5,2:0.25); replaces --prune-layer and --prune-ratio.",
        ),
        cache: str | None = typer.Option(
            None,
            "--cache",
            help="KV cache storage: dynamic (the model's precision, "
            "default) or fp8 (8-bit floats, a quarter of float32).",
        ),
        kv_method: str | None = typer.Option(
            None,
            "--kv-method",
            help="KV-cache compression: none (default), "
            "snapkv (prompt at prefill), streaming (sinks + recent) or h2o "
            "(sinks + recent + heavy hitters).",
        ),
        kv_budget: int | None = typer.Option(
            None, "--kv-budget", help="Most KV entries a row holds per layer and head (default: no limit)."
        ),
        kv_window: int | None = typer.Option(
            None, "--kv-window", help="snapkv/h2o: observation window and recent entries always kept (default 32)."
        ),
        kv_sinks: int | None = typer.Option(None, "--kv-sinks", help="First tokens always kept (default 4)."),
        spec: bool = typer.Option(
            False,
            "--spec/--no-spec",
            help="Speculative Jacobi decoding of image blocks: "
            "several code tokens per forward pass, same "
            "distribution (greedy: same tokens).",
        ),
        spec_window: int = typer.Option(16, "--spec-window", help="Draft tokens verified per forward pass (>= 1)."),
        spec_delta: float = typer.Option(
            0.0,
            "--spec-delta",
            help="Relaxed acceptance: most codebook-neighbour mass credited to a draft, in [0, 1] (0 = exact).",
        ),
        spec_neighbours: int = typer.Option(
            8, "--spec-neighbours", help="Codebook neighbours per code that the relaxed acceptance credits."
        ),
        detokenizer: str | None = typer.Option(
            None,
            "--detokenizer",
            help="Draw pictures with this diffusion "
            "detokenizer (a pipeline directory, or a folder of x1/ x2/); none: "
            "the image tokenizer's decoder. Default: the checkpoint's "
            "detokenizer/ when it has one.",
        ),
        detok_steps: int | None = typer.Option(None, "--detok-steps", help="Detokenizer denoising steps (default 4)."),
        detok_cfg_scale: float | None = typer.Option(
            None, "--detok-cfg-scale", help="Detokenizer guidance (1 = off, the default)."
        ),
        detok_scale: int | None = typer.Option(
            None,
            "--detok-scale",
            help="2: draw at twice the tokenizer's resolution with the 2x super-resolution detokenizer.",
        ),
        options: list[str] | None = typer.Argument(
            None,
            help="More generation options as key=value (any "
            "GenerationOptions field), e.g. detok_scheduler=dpm cache=fp8.",
        ),
    ):
        """Generate interleaved text, images and speech; print the text, write each image as PNG and each
        audio block as WAV (at the codec's sample rate).

        Temperature, top-k, top-p and CFG scale default to the settings the checkpoint was evaluated
        with (its generation_config.json; the quick start's for checkpoints without one).

        Pictures are drawn by the checkpoint's diffusion detokenizer when it has one (its detokenizer/
        folder) or --detokenizer names one, else by the image tokenizer's decoder; the last line says which.

        \b
        Example:
            mmgen generate --checkpoint runs/quickstart/sft/final --mode t2i --seed 1
                --prompt "a large red circle at the top left, on a black background." --out out/
            mmgen generate --checkpoint runs/quickstart/sft/final --mode t2i --prompt "a blue star"
                --detokenizer runs/detok/pipeline --detok-steps 4 detok_scheduler=dpm
            mmgen generate --checkpoint runs/speech/final --mode tts --prompt "a red sound." --out out/
            mmgen generate --checkpoint runs/quickstart/sft/final --picture scene.png --mode text
                --prompt "what colour is the circle?" --prune-method fastv --prune-ratio 0.25 --prune-layer 1
            mmgen generate --checkpoint runs/quickstart/sft/final --prompt "..." --kv-method h2o --kv-budget 256
                --cache fp8
            mmgen generate --checkpoint runs/quickstart/sft/final --mode t2i --prompt "..." --spec --spec-window 16
        """
        from mmgen.data.doc import Audio, Image
        from mmgen.inference.detokenize import decoder_label
        from mmgen.inference.generate import run_generate
        from mmgen.inference.prune import parse_schedule

        given = dict(cache=cache, kv_method=kv_method, kv_budget=kv_budget, kv_window=kv_window, kv_sinks=kv_sinks)
        flags = {
            "detok_path": detokenizer,
            "detok_steps": detok_steps,
            "detok_cfg_scale": detok_cfg_scale,
            "detok_scale": detok_scale,
        }
        doc, paths = run_generate(
            checkpoint,
            prompt,
            out=out,
            mode=mode,
            seed=seed,
            cfg_scale=cfg_scale,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            device=device,
            allow_audio=allow_audio,
            max_audio_frames=max_audio_frames,
            picture=picture,
            prune_method=prune_method,
            prune_ratio=prune_ratio,
            prune_layer=prune_layer,
            prune_schedule=parse_schedule(prune_schedule or ""),
            spec_decoding=spec,
            spec_window=spec_window,
            spec_delta=spec_delta,
            spec_neighbours=spec_neighbours,
            overrides=options or [],
            **{k: v for k, v in {**given, **flags}.items() if v is not None},
        )
        media = iter(paths)  # run_generate lists the files in item order
        for it in doc.items:
            if isinstance(it, Image):
                typer.echo(f"[image {it.meta['width']}x{it.meta['height']}: {next(media)}]")
            elif isinstance(it, Audio):
                typer.echo(f"[audio {it.meta['duration']:.2f} s: {next(media)}]")
            else:
                typer.echo(it.text)
        if doc.meta.get("prune"):
            p = doc.meta["prune"]
            typer.echo(
                f"(pruned: {p['method']} kept {p['tokens_kept'][0]} of {p['tokens'][0]} prompt tokens, "
                f"prefill FLOPs x{p['flops_ratio']:.2f})",
                err=True,
            )
        if doc.meta.get("note"):
            typer.echo(f"note: {doc.meta['note']}", err=True)
        kv = doc.meta["kv"]
        if kv["method"] != "none":
            typer.echo(
                f"kv cache ({kv['method']}, budget {kv['budget']}): {kv['tokens_held'][0]} of "
                f"{kv['tokens_seen'][0]} tokens held, {kv['bytes']} bytes (peak {kv['bytes_peak']})",
                err=True,
            )
        drawn = f"; pictures drawn by the {decoder_label(doc.meta['image_decoder'])}" if doc.images else ""
        typer.echo(
            f"({doc.meta['new_tokens']} tokens, {doc.meta['forward_passes']} forward passes, "
            f"{doc.meta['tokens_per_s']} tokens/s, stopped at {doc.meta['stop']}; {len(paths)} media file(s) "
            f"in {out}{drawn})",
            err=True,
        )
        if "spec" in doc.meta:
            s = doc.meta["spec"]
            typer.echo(
                f"(speculative decoding: {s['tokens'] / max(1, s['passes']):.2f} image tokens per pass)", err=True
            )
