"""``mmgen filter``: clean a corpus of Docs with a recipe of quality and deduplication operators."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("filter")
    def filter_cmd(
        recipe: str = typer.Option(
            ..., "--recipe", "-r", help="Recipe YAML path, or a name in data_pipelines/ (e.g. shapesworld)."
        ),
        input: str = typer.Option(
            ...,
            "--input",
            "-i",
            help="Input files: a glob ('data/*.tar'), a directory, a .tar, a .jsonl (any "
            "converter format) or a .parquet.",
        ),
        out: str = typer.Option(
            ...,
            "--out",
            "-o",
            help="Output folder (kept shards, rejects/, quarantine/, stats/, summary.json, "
            "report.md). Rerun to resume.",
        ),
        executor: str = typer.Option(
            "local",
            "--executor",
            "-e",
            help="local (worker processes) or ray (Ray tasks; RAY_ADDRESS for a running cluster).",
        ),
        workers: int = typer.Option(
            2, "--workers", "-w", help="Worker processes / Ray CPUs (the output does not depend on it)."
        ),
        shard_size: int = typer.Option(1000, "--shard-size", help="Documents per output shard."),
        input_format: str = typer.Option(
            "auto", "--input-format", help="Format of jsonl/parquet inputs: auto, mmgen, obelics, mmc4, dj, llava."
        ),
        save_reject_media: bool = typer.Option(
            False, "--save-reject-media", help="Also copy rejected images/audio/video into rejects/media/ to inspect."
        ),
        dry_run: bool = typer.Option(
            False,
            "--dry-run",
            help="Compute statistics, report and decisions only; write no shards (to choose thresholds).",
        ),
        media_root: str | None = typer.Option(
            None,
            "--media-root",
            help="A folder records' media paths may name besides the input file's "
            "own folder; paths leading anywhere else are quarantined "
            "(path_outside_root).",
        ),
        allow_outside_root: bool = typer.Option(
            False, "--allow-outside-root", help="Let records name media files anywhere (trusted corpora only)."
        ),
        unit_bytes: int | None = typer.Option(
            None,
            "--unit-bytes",
            help="Size of a work unit of a large jsonl/parquet file (default: about "
            "1/64 of the corpus, 256 KiB to 64 MiB).",
        ),
        max_image_pixels: int | None = typer.Option(
            None,
            "--max-image-pixels",
            help="Images (and video frames) of more pixels are quarantined as "
            "too_many_pixels before decoding (default: the recipe's, else "
            "89,478,485).",
        ),
    ) -> None:
        """Filter and deduplicate documents with a recipe of operators.

        Examples:

          mmgen filter --recipe shapesworld --input 'world/*.tar' --out filtered/ --workers 2

          mmgen filter -r data_pipelines/obelics_en.yaml -i 'obelics/*.parquet' -o out/ --executor ray

          mmgen filter -r my.yaml -i data.jsonl -o dry/ --dry-run   # then read dry/report.md
        """
        from mmgen.data.pipeline import run_filter

        s = run_filter(
            recipe,
            input,
            out,
            workers=workers,
            shard_size=shard_size,
            dry_run=dry_run,
            executor=executor,
            input_format=input_format,
            save_reject_media=save_reject_media,
            media_root=media_root,
            allow_outside_root=allow_outside_root,
            unit_bytes=unit_bytes,
            max_image_pixels=max_image_pixels,
        )
        typer.echo(summary_line(s, out))


def summary_line(s: dict, out: str) -> str:
    """The console summary: documents, then items removed or quarantined inside kept documents."""
    line = (
        f"{s['input']} docs: {s['kept']} kept ({s['kept_with_nodes_removed']} of them lost items: "
        f"{s['nodes_removed']} removed, {s.get('nodes_quarantined', 0)} quarantined), {s['rejected']} rejected, "
        f"{s['quarantined']} quarantined"
    )
    if s.get("media_not_fetched"):
        line += (
            f"; {s['media_not_fetched']} media URLs not fetched were kept unjudged by pixel operators "
            f"(run `mmgen fetch` first to judge them)"
        )
    return line + f" -> {out}/report.md"
