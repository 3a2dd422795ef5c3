"""``mmgen fetch``: download the media documents reference by URL (MMC4, OBELICS, OmniCorpus), with img2dataset."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("fetch")
    def fetch_cmd(
        input: str = typer.Argument(
            ..., help="Input files: a jsonl in any converter format, a glob, a .tar or a .parquet."
        ),
        out: str = typer.Argument(
            ..., help="Output folder (docs.jsonl, media/, failures.jsonl, summary.json). Rerun to resume."
        ),
        input_format: str = typer.Option(
            "auto", "--from", help="Input format: auto, mmgen, obelics, mmc4, dj, llava, wds."
        ),
        output_format: str = typer.Option(
            "mmgen", "--to", help="Output format: mmgen (docs.jsonl) or any converter format (wds: shards/)."
        ),
        timeout: float = typer.Option(
            10, "--timeout", help="Seconds a connection may stay silent before the URL fails."
        ),
        retries: int = typer.Option(0, "--retries", help="Extra tries per URL."),
        threads: int = typer.Option(16, "--threads", help="Download threads per process."),
        processes: int = typer.Option(1, "--processes", help="Download processes."),
        max_bytes: int = typer.Option(64 << 20, "--max-bytes", help="Largest file accepted, in bytes."),
        min_image_size: int = typer.Option(0, "--min-image-size", help="Smallest accepted image side, in pixels."),
        max_image_area: float = typer.Option(
            178956970, "--max-image-area", help="Largest accepted image area, in pixels."
        ),
        max_aspect_ratio: float | None = typer.Option(
            None, "--max-aspect-ratio", help="Largest accepted long/short side ratio."
        ),
        per_host_rate: float | None = typer.Option(
            None, "--per-host-rate", help="At most this many requests per second to one host."
        ),
    ) -> None:
        """Download the media of documents whose images, audio or video are URLs.

        The documents are written again with the fetched media attached (media/<sha1>.<ext>, each
        keeping its URL); a URL that fails stays a reference with meta fetch_error, and is listed in
        failures.jsonl with its reason. Rerunning with the same OUT fetches only what is missing.

        Example:

            mmgen fetch mmc4_shard.jsonl fetched/ --timeout 10 --per-host-rate 2 --min-image-size 64
        """
        from mmgen.data.fetch import fetch

        s = fetch(
            input,
            out,
            input_format=input_format,
            output_format=output_format,
            timeout=timeout,
            retries=retries,
            threads=threads,
            processes=processes,
            max_bytes=max_bytes,
            min_image_size=min_image_size,
            max_image_area=max_image_area,
            max_aspect_ratio=max_aspect_ratio,
            per_host_rate=per_host_rate,
        )
        typer.echo(json.dumps(s, ensure_ascii=False, indent=1))
        typer.echo(
            f"{s['urls']} URLs: {s['fetched']} fetched ({s['already_fetched']} downloaded in an earlier run), "
            f"{s['failed']} failed -> {s['failures_path']}",
            err=True,
        )
