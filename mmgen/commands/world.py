"""``mmgen world``: write the ShapesWorld synthetic corpus (shards + defect labels)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("world")
    def world(
        out: Path = typer.Option(..., "--out", help="Output directory for world-NNNNNN.tar shards and labels.jsonl."),
        docs: int = typer.Option(1000, "--docs", help="Number of documents."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical shards."),
        defect_rate: float = typer.Option(0.0, "--defect-rate", help="Share of docs with one labeled defect (0..1)."),
        mix: str = typer.Option(
            "", "--mix", help="Doc kind weights, e.g. caption=0.5,qa=0.2,buildup=0.2,video=0.05,speech=0.05."
        ),
        shard_size: int = typer.Option(1000, "--shard-size", help="Docs per shard."),
        size: int = typer.Option(64, "--size", help="Image side in pixels."),
    ):
        """Generate ShapesWorld docs (captions, QA, build-up, video, speech) with labeled defects.

        Example: mmgen world --out data/world --docs 3000 --seed 0 --defect-rate 0.1 --mix caption=0.5,qa=0.5
        """
        from mmgen.world.documents import write_world

        summary = write_world(
            out, n_docs=docs, seed=seed, defect_rate=defect_rate, shard_size=shard_size, mix=mix or None, size=size
        )
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "heldout_pairs"}, indent=1))
