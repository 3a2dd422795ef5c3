"""``mmgen fetch``: download the media that documents reference by URL, with img2dataset.

    summary = fetch("mmc4/*.jsonl", "fetched/", timeout=10, per_host_rate=2.0)

MMC4, OBELICS and OmniCorpus ship their images as URLs; a :class:`~mmgen.data.doc.Doc` keeps them as
references (``item.url``) and nothing downloads them implicitly. This stage does, once, with
img2dataset (the downloader these corpora's users know): its thread pool, socket timeout, retries,
``X-Robots-Tag`` opt-out and incremental (resumable) shards. img2dataset runs with
``disable_all_reencoding`` so the original bytes are kept as they were served; mmgen then applies the
limits itself, on each downloaded file (byte size; for images the header's pixel size and aspect
ratio, then a full decode), as img2dataset's documentation intends for that mode.

Output folder::

    docs.jsonl (or shards/ for --to wds)  the same documents; fetched media attached (media/<sha1>.<ext>),
                                          each keeping its URL; a failed one stays a URL reference with
                                          ``meta["fetch_error"]``
    media/                                the fetched files, named by content hash
    failures.jsonl                        one line per failed URL: url, reason, kind, the docs that use it
    errors.jsonl                          input records that could not be read, documents that could not be
                                          written (with their reasons)
    download/RUN-WAVE/                    img2dataset's work folders (url list, shards, per-shard parquet)
    summary.json

Resume: every run first takes in what earlier runs' img2dataset folders hold (finished shards'
parquet, and the files of an interrupted shard), then downloads only the URLs not fetched yet.
Counts add up: ``urls == fetched + failed``, and ``media_refs == media_fetched + media_failed``.

img2dataset downloads in worker processes started with ``spawn``: a script that calls :func:`fetch`
needs the usual ``if __name__ == "__main__":`` guard. Its per-host rate is kept by waves (img2dataset
has no per-host limit), and a file is measured against ``max_bytes`` once downloaded.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

from mmgen.data.doc import BadRecord, Doc
from mmgen.data.filter_inputs import read_input
from mmgen.data.formats import format_module, write_records
from mmgen.data.input_kind import INPUT_EXTS
from mmgen.data.media import decode_image, max_image_pixels, open_image, set_max_image_pixels
from mmgen.data.media_format import sniff_format
from mmgen.errors import MediaError, MMGenError
from mmgen.paths import expand_inputs

FETCH_ERROR = "fetch_error"  # item meta: why the medium could not be fetched


def input_docs(input, input_format: str):
    for path in expand_inputs(input, INPUT_EXTS):
        yield from read_input(path, input_format)


def download_problem(
    data: bytes, kind: str, max_bytes: int | None, min_image_size: int, max_aspect_ratio: float | None
) -> str | None:
    """Why the downloaded bytes are not acceptable, or None. An image goes through
    :func:`mmgen.data.media.open_image` (header only: an image over the pixel limit, which
    :func:`fetch` sets from ``max_image_area``, is refused before it is decoded), then
    :func:`~mmgen.data.media.decode_image`."""
    if not data:
        return "empty response"
    if max_bytes is not None and len(data) > max_bytes:
        return f"file too large ({len(data)} bytes > {max_bytes})"
    if kind != "image":
        return None if sniff_format(data) else f"not a recognised {kind} file"
    try:
        with open_image(data, "downloaded image") as img:
            w, h = img.size
        if min(w, h) < min_image_size:
            return f"image too small ({w}x{h})"
        if max_aspect_ratio is not None and max(w, h) / max(min(w, h), 1) > max_aspect_ratio:
            return f"aspect ratio too large ({w}x{h})"
        decode_image(data, "downloaded image", mode=None).close()
    except MediaError as e:  # every decoder failure is a reason, recorded with the URL
        if e.reason == "too_many_pixels":
            return f"image area too large: {e}"
        return f"corrupt image: {e}"
    return None


def _waves(urls: list[str], per_host_rate: float | None) -> tuple[list[list[str]], float]:
    """Split ``urls`` into waves of at most ``per_host_rate * period`` URLs per host, one wave per period:
    img2dataset has no per-host limit, so the waves are started no faster than that."""
    if not per_host_rate:
        return [urls], 0.0
    period = max(1.0, 1.0 / per_host_rate)
    per_wave = max(1, int(per_host_rate * period))
    by_host: dict[str, list[str]] = defaultdict(list)
    for u in urls:
        by_host[urlsplit(u).netloc.lower()].append(u)
    n_waves = max(math.ceil(len(v) / per_wave) for v in by_host.values()) if by_host else 0
    waves = [[u for v in by_host.values() for u in v[w * per_wave : (w + 1) * per_wave]] for w in range(n_waves)]
    return waves, period


def _collect(runs: list[Path], found: dict[str, dict] | None = None) -> dict[str, dict]:
    """What the img2dataset work folders ``runs`` (in order) hold, added to ``found``: url -> {"file"}
    for a download, {"error"} for a failure (a download from any run wins over a failure).

    Finished shards have a parquet of every sample's status; an interrupted shard has only the files
    of the samples it finished (``KEY.jpg`` + ``KEY.json``), which are taken too."""
    import pyarrow.parquet as pq

    found = {} if found is None else found
    for run in runs:
        for meta_file in sorted(run.glob("*/*.json")):
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                continue  # a sample cut while being written: fetched again
            blob = meta_file.with_suffix(".jpg")  # img2dataset's name; the bytes are the original ones
            if meta.get("status") == "success" and blob.is_file():
                found[meta["url"]] = {"file": str(blob)}
        for shard in sorted(run.glob("*.parquet")):
            if not (run / f"{shard.stem}_stats.json").is_file():
                continue  # still being written when the run stopped
            for row in pq.read_table(shard, columns=["url", "status", "error_message"]).to_pylist():
                if row["status"] != "success" and row["url"] not in found:
                    found[row["url"]] = {"error": row["error_message"] or row["status"] or "failed"}
    return found


def download_urls(
    urls: list[str],
    folder: Path,
    timeout: float,
    retries: int,
    threads: int,
    processes: int,
    shard_size: int,
    user_agent_token: str | None,
) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations: no network check
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset import download

    folder.mkdir(parents=True, exist_ok=True)
    url_list = folder.parent / f"{folder.name}.urls.parquet"
    pq.write_table(pa.table({"url": urls}), url_list)
    download(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        output_folder=str(folder),
        output_format="files",
        processes_count=processes,
        thread_count=threads,
        timeout=timeout,
        retries=retries,
        number_sample_per_shard=shard_size,
        resize_mode="no",
        disable_all_reencoding=True,
        extract_exif=False,
        compute_hash=None,
        enable_wandb=False,
        incremental_mode="incremental",
        user_agent_token=user_agent_token,
        disallowed_header_directives=["noai", "noimageai"],
    )


def fetch(
    input,
    out,
    input_format: str = "auto",
    output_format: str = "mmgen",
    timeout: float = 10,
    retries: int = 0,
    threads: int = 16,
    processes: int = 1,
    shard_size: int = 1000,
    max_bytes: int | None = 64 << 20,
    min_image_size: int = 0,
    max_image_area: float | None = 178956970,
    max_aspect_ratio: float | None = None,
    per_host_rate: float | None = None,
    user_agent_token: str | None = "mmgen",
    progress: bool = True,
) -> dict:
    """Download every URL medium of the documents in ``input`` into ``out`` (see the module docstring).

        ``timeout``: seconds a connection may stay silent; ``max_bytes``, ``min_image_size`` (shorter side,
        pixels), ``max_image_area`` (pixels; twice Pillow's warning threshold by default, None: no limit; checked
    on the header, before decoding), ``max_aspect_ratio``:
        limits a download must meet; ``per_host_rate``: requests per second to one host at most (None: no
        limit). Rerunning with the same ``out`` resumes: nothing fetched before is fetched again."""
    writer = format_module(output_format)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if per_host_rate is not None and per_host_rate <= 0:
        raise MMGenError(f"per_host_rate must be positive (requests per second), got {per_host_rate}")
    records = list(input_docs(input, input_format))
    docs = [r for r in records if isinstance(r, Doc)]
    bad = [r for r in records if isinstance(r, BadRecord)]
    wanted: dict[str, str] = {}  # url -> kind
    for d in docs:
        for it in d.media:
            if not it.fetched:
                wanted.setdefault(it.url, it.kind)

    download_dir = out / "download"
    found = _collect(sorted(download_dir.iterdir()) if download_dir.is_dir() else [])
    # Bytes downloaded before are checked again, never downloaded again; failed downloads are retried.
    todo = [u for u in wanted if u not in found or "error" in found[u]]
    previously = len(wanted) - len(todo)
    waves, period = _waves(todo, per_host_rate)
    done_runs = [int(p.name[3:6]) for p in download_dir.glob("run*-*") if p.is_dir()] if download_dir.is_dir() else []
    run = max(done_runs, default=-1) + 1
    for w, wave in enumerate(waves):
        start = time.monotonic()
        download_urls(
            wave,
            download_dir / f"run{run:03d}-{w:05d}",
            timeout,
            retries,
            threads,
            processes,
            shard_size,
            user_agent_token,
        )
        if w + 1 < len(waves):
            time.sleep(max(0.0, period - (time.monotonic() - start)))
    _collect([download_dir / f"run{run:03d}-{w:05d}" for w in range(len(waves))], found)  # this run's folders

    result: dict[str, tuple[bytes | None, str | None]] = {}
    previous_limit = max_image_pixels()
    set_max_image_pixels(sys.maxsize if max_image_area is None else max(1, int(max_image_area)))
    try:
        for url, kind in wanted.items():
            got = found.get(url)
            if got is None:
                result[url] = (None, "no result from the downloader")
            elif "error" in got:
                result[url] = (None, got["error"])
            else:
                data = Path(got["file"]).read_bytes()
                why = download_problem(data, kind, max_bytes, min_image_size, max_aspect_ratio)
                result[url] = (None, why) if why else (data, None)
    finally:
        set_max_image_pixels(previous_limit)  # the limit is this call's, not the process's

    users: dict[str, list] = defaultdict(list)
    n_fetched_items = n_failed_items = 0
    for d in docs:
        for it in d.media:
            if it.fetched:
                continue
            data, why = result[it.url]
            users[it.url].append(d.id)
            if data is not None:
                it.data, it.format = data, sniff_format(data) or it.format
                it.meta.pop(FETCH_ERROR, None)
                n_fetched_items += 1
            else:
                it.meta[FETCH_ERROR] = why
                n_failed_items += 1

    failures_path = out / "failures.jsonl"
    with open(failures_path, "w", encoding="utf-8") as f:
        for url, (data, why) in result.items():
            if data is None:
                f.write(
                    json.dumps({"url": url, "kind": wanted[url], "reason": why, "docs": users[url]}, ensure_ascii=False)
                    + "\n"
                )
    target = out / "shards" if writer.__name__.endswith(".wds") else out / "docs.jsonl"
    with open(out / "errors.jsonl", "w", encoding="utf-8") as errors:
        # the unreadable input records and the documents the writer refuses, in input order, with reasons
        counts = write_records(
            records,
            target,
            output_format,
            on_bad=lambda b: errors.write(json.dumps(b.to_json(), ensure_ascii=False) + "\n"),
        )
    n_failed = sum(1 for data, _ in result.values() if data is None)
    reasons: dict[str, int] = defaultdict(int)
    for data, why in result.values():
        if data is None:
            reasons[why.split(" (")[0].split(":")[0]] += 1
    summary = {
        "input": str(input),
        "output": str(target),
        "records": len(records),
        "docs": len(docs),
        "bad": len(bad),
        "written": counts["written"],
        "urls": len(wanted),
        "fetched": len(wanted) - n_failed,
        "failed": n_failed,
        "already_fetched": previously,
        "downloaded_now": len(todo),
        "media_refs": n_fetched_items + n_failed_items,
        "media_fetched": n_fetched_items,
        "media_failed": n_failed_items,
        "failure_reasons": dict(reasons),
        "waves": len(waves),
        "failures_path": str(failures_path),
    }
    assert summary["urls"] == summary["fetched"] + summary["failed"], summary
    assert summary["records"] == summary["written"] + counts["bad"], summary
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary
