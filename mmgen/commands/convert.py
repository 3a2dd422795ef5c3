"""``mmgen convert``: between interleaved corpus formats (OBELICS, MMC4, Data-Juicer, LLaVA, shards)."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        input: str = typer.Argument(..., help="Input file, directory or glob."),
        output: str = typer.Argument(..., help="Output file (a directory for --to wds)."),
        src: str = typer.Option(..., "--from", help="Input format: obelics, mmc4, dj, llava, wds, mmgen."),
        dst: str = typer.Option(..., "--to", help="Output format: obelics, mmc4, dj, llava, wds, mmgen."),
        media_root: str | None = typer.Option(
            None,
            "--media-root",
            help="Folder holding media that relative paths do not reach; records "
            "may name files only there and in the input's folder (else "
            "path_outside_root).",
        ),
        allow_outside_root: bool = typer.Option(
            False, "--allow-outside-root", help="Let records name media files anywhere (trusted corpora only)."
        ),
        max_image_pixels: int | None = typer.Option(
            None,
            "--max-image-pixels",
            help="Images of more pixels (read from the header) are "
            "quarantined as too_many_pixels (default 89,478,485).",
        ),
        path_map: list[str] | None = typer.Option(
            None, "--path-map", help="Rewrite a media path prefix, OLD=NEW (repeatable)."
        ),
        max_docs: int = typer.Option(1000, "--max-docs", help="Docs per shard (wds output)."),
        lossy: bool = typer.Option(
            False,
            "--lossy",
            help="Allow a conversion that loses information (an "
            "interleaved document into LLaVA turns); refused without it.",
        ),
    ):
        """Convert interleaved documents from one format to another, losslessly.

        URL media stay URLs (``mmgen fetch`` downloads them). LLaVA holds conversations only: writing
        another document there is refused unless --lossy.

        Media are copied next to the output (media/<sha1>.<ext>) or into the shards. Bad records are
        reported, written to OUT.errors.jsonl (OUT/errors.jsonl for wds) and skipped; the exit status
        is 0 as long as the arguments were usable.

        Example:

            mmgen convert --from dj --to wds data/demo.jsonl shards/ --media-root data/media
        """
        from mmgen.data.formats import convert

        opts = {"max_docs": max_docs} if dst.lower() in ("wds", "webdataset") else {}
        summary = convert(
            input,
            output,
            src,
            dst,
            media_root=media_root,
            path_map=path_map,
            lossy=lossy,
            allow_outside_root=allow_outside_root,
            max_image_pixels=max_image_pixels,
            **opts,
        )
        typer.echo(json.dumps(summary, ensure_ascii=False, indent=1))
        if summary["bad"]:
            typer.echo(f"{summary['bad']} bad record(s) skipped, reasons in {summary['errors_path']}", err=True)
