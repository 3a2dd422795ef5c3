"""``mmgen train-clip``: train the tiny CLIP teacher (thin wrapper over mmgen.models.clip_train)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-clip")
    def train_clip_cmd(
        config: str = typer.Argument(..., help="Recipe YAML: a path, or a name in tokenizers/ (e.g. tiny_clip)."),
        overrides: list[str] | None = typer.Argument(
            None, help="key=value overrides, e.g. steps=600 out_dir=runs/clip"
        ),
    ) -> None:
        """Train a tiny open_clip model contrastively on ShapesWorld captions and images.

        Example: mmgen train-clip tiny_clip out_dir=runs/clip/tiny steps=300
        """
        import json

        from mmgen.config import load_config
        from mmgen.models.clip_train import ClipTrainConfig, train_clip
        from mmgen.paths import recipe_path

        cfg = load_config(ClipTrainConfig, recipe_path(config, "tokenizers"), overrides or [])
        path = train_clip(cfg)
        report = json.loads((path.parent / "eval.json").read_text())
        typer.echo(
            f"CLIP saved to {path}; held-out zero-shot colour acc {report['zero_shot_color_acc']:.3f}, "
            f"shape acc {report['zero_shot_shape_acc']:.3f} (eval: {cfg.out_dir}/eval.json)"
        )
