"""``mmgen train-audio-tokenizer``: a thin wrapper over mmgen.tokenizers.audio_train."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-audio-tokenizer")
    def train_audio_tokenizer_cmd(
        config: str = typer.Argument(..., help="Recipe YAML: a path, or a name in tokenizers/ (e.g. tiny_audio)."),
        overrides: list[str] | None = typer.Argument(
            None, help="key=value overrides, e.g. steps=100 out_dir=runs/audio"
        ),
    ) -> None:
        """Train the residual-VQ audio codec (DAC) on spoken ShapesWorld captions and real clips.

        Example: mmgen train-audio-tokenizer tiny_audio out_dir=runs/audio steps=300
        """
        from mmgen.config import load_config
        from mmgen.paths import recipe_path
        from mmgen.tokenizers.audio_train import AudioTrainConfig, train_audio_tokenizer

        cfg = load_config(AudioTrainConfig, recipe_path(config, "tokenizers"), overrides or [])
        path = train_audio_tokenizer(cfg)
        typer.echo(f"audio codec saved to {path} (metrics: {cfg.out_dir}/metrics.jsonl, eval: {cfg.out_dir}/eval.json)")
