"""``mmgen train``: DeepSpeed pretraining of the unified LM on code shards."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: str = typer.Argument("tiny_pretrain", help="Training YAML, or a recipe name in training/."),
        overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides, key=value (e.g. steps=50)."),
        launcher: str = typer.Option("deepspeed", "--launcher",
                                     help="deepspeed: training/pretrain.sh through the DeepSpeed launcher; "
                                          "none: one rank in this process (debugging)."),
        num_gpus: int = typer.Option(1, "--num-gpus", help="Ranks per node (CPU processes without a GPU)."),
        hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile for multi-node runs."),
    ):
        """Pretrain the unified LM with DeepSpeed; writes OUT_DIR/final (an mmgen bundle).

        Resumes from OUT_DIR/checkpoints when it exists (resume=false to start over).

        Example:

            mmgen train training/tiny_pretrain.yaml data.code_shards=runs/qs/codes data.image_tokenizer=runs/qs/vq steps=200
        """
        from mmgen.errors import MMGenError

        overrides = list(overrides or [])
        if launcher == "deepspeed":
            from mmgen.training.pretrain import launch_pretrain

            final = launch_pretrain(config, overrides, num_gpus=num_gpus, hostfile=hostfile)
        elif launcher == "none":
            if num_gpus != 1 or hostfile:
                raise MMGenError("--launcher none runs one rank; drop --num-gpus/--hostfile or use --launcher deepspeed")
            from mmgen.training.trainer import pretrain

            final = pretrain(config, overrides)
        else:
            raise MMGenError(f"unknown launcher '{launcher}' (use deepspeed or none)")
        typer.echo(f"bundle: {final}")
