"""``mmgen train-quality``: train the learned image-text quality scorer used by the ``quality_score`` filter op."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-quality")
    def train_quality_cmd(
        out: str = typer.Option(
            ..., "--out", "-o", help="Output directory (quality_config.json + quality_model.safetensors)."
        ),
        examples: int = typer.Option(
            8000, "--examples", help="Generated ShapesWorld pairs to train on (four quality levels, balanced)."
        ),
        epochs: int = typer.Option(30, "--epochs", help="Passes over the examples."),
        seed: int = typer.Option(0, "--seed", help="Seed for the examples and the initialisation."),
        image_size: int = typer.Option(32, "--image-size", help="Side the images are resized to."),
        lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate (one-cycle schedule)."),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from the latest epoch checkpoint in --out (same settings)."
        ),
    ) -> None:
        """Train a small multimodal classifier on semi-synthetic image-caption pairs at four quality
        levels (3 matching caption, 2 one wrong attribute, 1 unrelated caption, 0 gibberish or noise
        image) generated from ShapesWorld, and save it for the quality_score filter op.

        Examples:

          mmgen train-quality --out runs/quality

          mmgen train-quality --out runs/quality-small --examples 1000 --epochs 5

        Then in a recipe: {op: quality_score, level: node, params: {model: runs/quality, min_score: 0.5}}
        """
        from mmgen.training.quality import train_quality

        m = train_quality(out, examples=examples, epochs=epochs, seed=seed, image_size=image_size, lr=lr, resume=resume)
        typer.echo(json.dumps(m, indent=1))
