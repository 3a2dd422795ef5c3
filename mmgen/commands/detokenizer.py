"""``mmgen train-detokenizer``: a thin wrapper over mmgen.models.detokenizer_train."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-detokenizer")
    def train_detokenizer_cmd(
        config: str = typer.Argument(
            ..., help="Recipe YAML: a path, or a name in tokenizers/ (e.g. tiny_detokenizer)."
        ),
        overrides: list[str] | None = typer.Argument(
            None, help="key=value overrides, e.g. tokenizer=runs/vq/tokenizer scale=2"
        ),
    ) -> None:
        """Train the diffusion detokenizer (codes -> pixels, a diffusers pipeline) on an image tokenizer's codes.

        Examples:
          mmgen train-detokenizer tiny_detokenizer tokenizer=runs/tokenizer/tiny_vq/tokenizer
          mmgen train-detokenizer tiny_detokenizer scale=2 out_dir=runs/detok_sr2     # 2x super-resolution
        """
        from mmgen.config import load_config
        from mmgen.models.detokenizer_train import (
            DetokenizerTrainConfig,
            train_detokenizer,
        )
        from mmgen.paths import recipe_path

        cfg = load_config(DetokenizerTrainConfig, recipe_path(config, "tokenizers"), overrides or [])
        path = train_detokenizer(cfg)
        typer.echo(
            f"detokenizer pipeline saved to {path} (metrics: {cfg.out_dir}/metrics.jsonl, eval: "
            f"{cfg.out_dir}/eval.json)"
        )
