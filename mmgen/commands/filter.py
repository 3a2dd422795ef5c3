"""``mmgen filter``: clean a corpus of Docs with a recipe of quality and deduplication operators."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("filter")
    def filter_cmd(
        recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML path, or a name in data_pipelines/ (e.g. shapesworld)."),
        input: str = typer.Option(..., "--input", "-i", help="Input shards: a glob ('data/*.tar'), a directory, a .tar or an mmgen .jsonl."),
        out: str = typer.Option(..., "--out", "-o", help="Output folder (kept shards, rejects/, quarantine/, summary.json, report.md). Rerun to resume."),
        workers: int = typer.Option(2, "--workers", "-w", help="Worker processes (the output does not depend on it)."),
        shard_size: int = typer.Option(1000, "--shard-size", help="Documents per output shard."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Compute statistics and decisions only; write no shards."),
    ) -> None:
        """Filter and deduplicate documents with a recipe of operators.

        Example: mmgen filter --recipe shapesworld --input 'world/*.tar' --out filtered/ --workers 2
        """
        from mmgen.data.pipeline import run_filter

        s = run_filter(recipe, input, out, workers=workers, shard_size=shard_size, dry_run=dry_run)
        typer.echo(f"{s['input']} docs: {s['kept']} kept ({s['kept_with_nodes_removed']} with {s['nodes_removed']} "
                   f"items removed), {s['rejected']} rejected, {s['quarantined']} quarantined -> {out}/report.md")
