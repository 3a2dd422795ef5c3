"""``mmgen train-tokenizer`` and ``mmgen tokenize``: thin wrappers over mmgen.tokenizers."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-tokenizer")
    def train_tokenizer_cmd(
        config: str = typer.Argument(
            ..., help="Recipe YAML: a path, or a name in tokenizers/ (e.g. tiny_dualvitok, tiny_vq)."
        ),
        overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. steps=100 out_dir=runs/vq"),
    ) -> None:
        """Train an image tokenizer from a recipe: DualViTok (semantic + pixel codes) or the pixel VQ.

        \b
        Examples:
          mmgen train-clip tiny_clip && mmgen train-tokenizer tiny_dualvitok
          mmgen train-tokenizer tiny_dualvitok steps=1500 resume=true
          mmgen train-tokenizer tiny_vq out_dir=runs/vq inputs=[data/world/train]
        """
        from mmgen.config import load_config
        from mmgen.paths import recipe_path
        from mmgen.tokenizers.train import train_tokenizer
        from mmgen.tokenizers.train_config import TokenizerTrainConfig

        cfg = load_config(TokenizerTrainConfig, recipe_path(config, "tokenizers"), overrides or [])
        path = train_tokenizer(cfg)
        typer.echo(f"tokenizer saved to {path} (metrics: {cfg.out_dir}/metrics.jsonl, eval: {cfg.out_dir}/eval.json)")

    @app.command("fit-blocks")
    def fit_blocks_cmd(
        tokenizer: str = typer.Option(
            ..., "--tokenizer", help="Directory of the image tokenizer that wrote the code shards."
        ),
        codes: list[str] = typer.Option(
            ..., "--codes", help="Code shards to count blocks in: a file, a directory or a glob (repeatable)."
        ),
        out: str = typer.Option(
            ..., "--out", help="Directory for the code-block tokenizer (the inner tokenizer is copied into out/inner)."
        ),
        block: int | None = typer.Option(
            None,
            "--block",
            help="Block side in codes (default: DualViTok's semantic ratio, one block per semantic code; else 2).",
        ),
        max_size: int = typer.Option(
            1024, "--max-size", help="At most this many blocks in the table (the LM's image code range)."
        ),
        min_count: int = typer.Option(2, "--min-count", help="Keep blocks seen at least this often."),
        split: list[str] = typer.Option(
            ["train"], "--split", help="Count documents of these splits only (repeatable); 'all' for every document."
        ),
        compose_world: bool = typer.Option(
            False,
            "--compose-world",
            help="Label the blocks with the ShapesWorld object each shows and add the blocks of every object the "
            "tokenizer can encode, held-out colour-shape pairs included (for model.block_factors).",
        ),
    ) -> None:
        """Fit a code-block table: one token per frequent BLOCK x BLOCK block of pixel codes, so an LM reads
        and writes an image in fewer tokens (blocks outside the table become the nearest entry). Then
        tokenize with --tokenizer OUT as with any tokenizer.

        \b
        Example:
          mmgen fit-blocks --tokenizer runs/quickstart/tokenizer/tokenizer --codes runs/quickstart/codes \\
            --out runs/blocks/tokenizer
        """
        from mmgen.tokenizers import load_image_tokenizer
        from mmgen.tokenizers.blocks import compose_world_blocks, fit_code_blocks

        splits = None if "all" in split else list(split)
        path = fit_code_blocks(
            tokenizer, list(codes), out, block=block, max_size=max_size, min_count=min_count, splits=splits
        )
        s = load_image_tokenizer(path).fit_stats
        typer.echo(
            f"{s['table_size']} blocks kept of {s['distinct']} distinct ({s['blocks']} blocks in {s['grids']} "
            f"images): "
            f"the table covers {100 * s['coverage']:.2f}% of them; saved to {path}"
        )
        if compose_world:
            s = compose_world_blocks(path)
            typer.echo(f"{s['labelled']} blocks labelled, {s['composed']} composed blocks added")

    @app.command("tokenize")
    def tokenize_cmd(
        tokenizer: str = typer.Option(..., "--tokenizer", help="Directory of a saved image tokenizer."),
        input: list[str] = typer.Option(..., "--input", help="Doc shards: a file, a directory or a glob (repeatable)."),
        out: str = typer.Option(
            ..., "--out", help="Output directory for code shards, summary.json and quarantine.jsonl."
        ),
        batch_size: int = typer.Option(64, "--batch-size", help="Images encoded per batch."),
        keep_media: bool = typer.Option(
            False, "--keep-media", help="Also keep the original media bytes in the code shards."
        ),
        keep_aspect: bool = typer.Option(
            False,
            "--keep-aspect",
            help="Encode at each image's aspect ratio (same area) instead of the tokenizer's square resolution.",
        ),
        audio_tokenizer: str | None = typer.Option(
            None,
            "--audio-tokenizer",
            help="Directory of a saved audio codec (`mmgen "
            "train-audio-tokenizer`): audio items become (levels, T) "
            "codes.",
        ),
        video: bool = typer.Option(
            False,
            "--video",
            help="Encode video items: sampled frames through the image tokenizer, with temporal token merging.",
        ),
        video_fps: float = typer.Option(2.0, "--video-fps", help="Frames sampled per second of video."),
        video_max_frames: int = typer.Option(
            16, "--video-max-frames", help="At most this many frames per video, spread over the clip."
        ),
        executor: str = typer.Option(
            "local",
            "--executor",
            help="Where the input files are tokenized: local (processes on this machine) or "
            "ray (Ray tasks; RAY_ADDRESS for a running cluster).",
        ),
        workers: int = typer.Option(
            1,
            "--workers",
            help="Worker processes (local) or CPUs of a local Ray cluster; the shards are the same for any number.",
        ),
        max_image_pixels: int | None = typer.Option(
            None,
            "--max-image-pixels",
            help="Images (and video frames) of more pixels are quarantined as "
            "too_many_pixels before decoding (default 89,478,485).",
        ),
    ) -> None:
        """Pre-tokenize Doc shards: every image item becomes a grid of codes in code shards
        (DualViTok: pixel codes plus the semantic grid beside them); with --audio-tokenizer audio
        items become codec codes, with --video video items become merged frame codes.

        \b
        Examples:
          mmgen tokenize --tokenizer runs/vq/tokenizer --input 'data/world/*.tar' --out runs/codes
          mmgen tokenize --tokenizer runs/vq/tokenizer --audio-tokenizer runs/audio/codec --video \\
            --input data/world --out runs/codes
          mmgen tokenize --tokenizer runs/vq/tokenizer --input data/world --out runs/codes --executor ray --workers 8

        Each input file is a work unit with a done marker: run the same command again to resume.
        """
        from mmgen.tokenizers.pretokenize import pretokenize

        s = pretokenize(
            tokenizer,
            list(input),
            out,
            batch_size=batch_size,
            keep_media=keep_media,
            keep_aspect=keep_aspect,
            audio_tokenizer=audio_tokenizer,
            video=video,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            executor=executor,
            workers=workers,
            max_image_pixels=max_image_pixels,
        )
        typer.echo(
            f"{s['docs_in']} docs in: {s['docs_written']} written, {s['quarantined']} quarantined "
            f"({out}/quarantine.jsonl); {s['images_encoded']} images, {s['audio_items_encoded']} audio and "
            f"{s['video_items_encoded']} video items encoded ({s['video_tokens_after']} of "
            f"{s['video_tokens_before']} video tokens kept by merging); "
            f"{s['audio_items_without_codes']} audio and {s['video_items_without_codes']} video items left "
            f"without codes"
        )
