"""``mmgen train-tokenizer`` and ``mmgen tokenize``: thin wrappers over mmgen.tokenizers."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-tokenizer")
    def train_tokenizer_cmd(
        config: str = typer.Argument(..., help="Recipe YAML: a path, or a name in tokenizers/ (e.g. tiny_dualvitok, tiny_vq)."),
        overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. steps=100 out_dir=runs/vq"),
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
        from mmgen.tokenizers.train import TokenizerTrainConfig, train_tokenizer

        cfg = load_config(TokenizerTrainConfig, recipe_path(config, "tokenizers"), overrides or [])
        path = train_tokenizer(cfg)
        typer.echo(f"tokenizer saved to {path} (metrics: {cfg.out_dir}/metrics.jsonl, eval: {cfg.out_dir}/eval.json)")

    @app.command("tokenize")
    def tokenize_cmd(
        tokenizer: str = typer.Option(..., "--tokenizer", help="Directory of a saved image tokenizer."),
        input: List[str] = typer.Option(..., "--input", help="Doc shards: a file, a directory or a glob (repeatable)."),
        out: str = typer.Option(..., "--out", help="Output directory for code shards, summary.json and quarantine.jsonl."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images encoded per batch."),
        keep_media: bool = typer.Option(False, "--keep-media", help="Also keep the original media bytes in the code shards."),
        keep_aspect: bool = typer.Option(False, "--keep-aspect", help="Encode at each image's aspect ratio (same area) instead of the tokenizer's square resolution."),
        audio_tokenizer: Optional[str] = typer.Option(None, "--audio-tokenizer", help="Directory of a saved audio codec (`mmgen train-audio-tokenizer`): audio items become (levels, T) codes."),
        video: bool = typer.Option(False, "--video", help="Encode video items: sampled frames through the image tokenizer, with temporal token merging."),
        video_fps: float = typer.Option(2.0, "--video-fps", help="Frames sampled per second of video."),
        video_max_frames: int = typer.Option(16, "--video-max-frames", help="At most this many frames per video, spread over the clip."),
    ) -> None:
        """Pre-tokenize Doc shards: every image item becomes a grid of codes in code shards
        (DualViTok: pixel codes plus the semantic grid beside them); with --audio-tokenizer audio
        items become codec codes, with --video video items become merged frame codes.

        \b
        Examples:
          mmgen tokenize --tokenizer runs/vq/tokenizer --input 'data/world/*.tar' --out runs/codes
          mmgen tokenize --tokenizer runs/vq/tokenizer --audio-tokenizer runs/audio/codec --video --input data/world --out runs/codes
        """
        from mmgen.tokenizers.pretokenize import pretokenize

        s = pretokenize(tokenizer, list(input), out, batch_size=batch_size, keep_media=keep_media, keep_aspect=keep_aspect,
                        audio_tokenizer=audio_tokenizer, video=video, video_fps=video_fps, video_max_frames=video_max_frames)
        typer.echo(f"{s['docs_in']} docs in: {s['docs_written']} written, {s['quarantined']} quarantined "
                   f"({out}/quarantine.jsonl); {s['images_encoded']} images, {s['audio_items_encoded']} audio and "
                   f"{s['video_items_encoded']} video items encoded ({s['video_tokens_after']} of "
                   f"{s['video_tokens_before']} video tokens kept by merging); "
                   f"{s['audio_items_without_codes']} audio and {s['video_items_without_codes']} video items left without codes")
