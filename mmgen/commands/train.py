"""``mmgen train`` and ``mmgen sft``: DeepSpeed training of the unified LM (any stage) on code shards;
``mmgen pack``: the packed shards a streamed run reads."""

from __future__ import annotations

import typer


def _run(config: str, overrides: list[str], launcher: str, num_gpus: int, hostfile: str | None):
    from mmgen.errors import MMGenError

    if launcher == "deepspeed":
        from mmgen.training.pretrain import launch_pretrain

        return launch_pretrain(config, overrides, num_gpus=num_gpus, hostfile=hostfile)
    if launcher == "none":
        if num_gpus != 1 or hostfile:
            raise MMGenError("--launcher none runs one rank; drop --num-gpus/--hostfile or use --launcher deepspeed")
        from mmgen.training.trainer import pretrain

        return pretrain(config, overrides)
    raise MMGenError(f"unknown launcher '{launcher}' (use deepspeed or none)")


_LAUNCHER = typer.Option(
    "deepspeed",
    "--launcher",
    help="deepspeed: training/pretrain.sh through the DeepSpeed launcher; none: one rank in this process (debugging).",
)
_NUM_GPUS = typer.Option(1, "--num-gpus", help="Ranks per node (CPU processes without a GPU).")
_HOSTFILE = typer.Option(None, "--hostfile", help="DeepSpeed hostfile for multi-node runs.")
_OVERRIDES = typer.Argument(None, help="Config overrides, key=value (e.g. steps=50).")


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: str = typer.Argument("tiny_pretrain", help="Training YAML, or a recipe name in training/."),
        overrides: list[str] | None = _OVERRIDES,
        launcher: str = _LAUNCHER,
        num_gpus: int = _NUM_GPUS,
        hostfile: str | None = _HOSTFILE,
    ):
        """Train the unified LM with DeepSpeed (stage align, pretrain or sft, as the config says);
        writes OUT_DIR/final (an mmgen bundle).

        Resumes from OUT_DIR/checkpoints when it exists (resume=false to start over).

        Examples:

            mmgen train training/tiny_pretrain.yaml data.code_shards=runs/quickstart/blocks/codes \\
              data.image_tokenizer=runs/quickstart/blocks/tokenizer steps=200

            mmgen train tiny_align data.code_shards=runs/quickstart/blocks/codes \\
              data.image_tokenizer=runs/quickstart/blocks/tokenizer

            mmgen train tiny_pretrain ... --num-gpus 2      # two ranks on one machine
        """
        typer.echo(f"bundle: {_run(config, list(overrides or []), launcher, num_gpus, hostfile)}")

    @app.command("sft")
    def sft_cmd(
        config: str = typer.Argument("tiny_sft", help="SFT YAML, or a recipe name in training/."),
        overrides: list[str] | None = _OVERRIDES,
        launcher: str = _LAUNCHER,
        num_gpus: int = _NUM_GPUS,
        hostfile: str | None = _HOSTFILE,
    ):
        """Supervised fine-tuning in the chat template (loss on assistant turns only); `mmgen train`
        with stage=sft. Python: mmgen.training.trainer.sft(config, overrides).

        Examples:

            mmgen sft tiny_sft init_from=runs/tiny_pretrain/final data.code_shards=runs/quickstart/blocks/codes

            mmgen sft tiny_sft init_from=runs/tiny_pretrain/final lora.enabled=true
        """
        typer.echo(f"bundle: {_run(config, [*(overrides or []), 'stage=sft'], launcher, num_gpus, hostfile)}")

    @app.command("pack")
    def pack_cmd(
        config: str = typer.Argument(
            "tiny_pretrain", help="Training YAML, or a recipe name in training/: its data settings decide the rows."
        ),
        overrides: list[str] | None = _OVERRIDES,
        out: str = typer.Option(
            ..., "--out", help="Output directory: packed-*.tar, index.json, text_tokenizer/, vocab.json."
        ),
        executor: str = typer.Option(
            "local", "--executor", help="local (processes on this machine) or ray (Ray tasks)."
        ),
        workers: int = typer.Option(1, "--workers", help="Worker processes (local) or CPUs of a local Ray cluster."),
    ):
        """Pack code shards into ready-to-train rows, one packed shard per code shard, with the text
        tokenizer trained once on a sample (data.text_sample_docs). Train on them with
        data.source=packed data.packed_shards=OUT: each rank streams its own shards. Rerun to resume.

        Examples:

            mmgen pack tiny_pretrain data.code_shards=runs/qs/codes data.image_tokenizer=runs/qs/vq --out runs/qs/packed

            mmgen train tiny_pretrain data.source=packed data.packed_shards=runs/qs/packed \\
              data.image_tokenizer=runs/qs/vq
        """
        from mmgen.training.pack import pack

        index = pack(config, list(overrides or []), out, executor=executor, workers=workers)
        t = index["totals"]["packing"]
        typer.echo(
            f"{t['docs']} documents -> {t['rows']} rows of {t['seq_len']} tokens (fill {t['fill_rate']:.3f}) "
            f"in {len(index['shards'])} packed shards; {t['docs_dropped']} dropped (an item longer than a row); "
            f"{out}/index.json"
        )
