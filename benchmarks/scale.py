"""Training past one machine's memory: streamed packed shards against the in-memory path, and tokenization
on executors.

    python benchmarks/scale.py                 # writes the "scale" section of BENCHMARKS.md

1. A demo-sized corpus of synthetic code shards (caption + image-code documents of the quick start's
   size; ``--codes DIR --codebook N`` takes real ones instead), packed once with ``mmgen pack``.
2. Side by side, interleaved over rounds: the tiny recipe trained from the code shards in memory
   (``data.source=memory``) and streamed from the packed shards (``data.source=packed``), each run a
   fresh process: tokens/s, time to the first step (start-up included), peak RSS.
3. The streamed run on 10x, 100x and 1000x the corpus: packed corpora whose shards are hard links to
   the demo's packed shards (the reader opens each as its own file; the disk is shared, so the copies
   cost no space). Peak RSS and time to first step should stay flat.
4. ``mmgen tokenize`` on the same Doc shards with 1 and 2 local workers and 2 Ray workers: docs/s,
   and whether the shards are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart"]
PLACES = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


def synthetic_code_shards(out: Path, n_docs: int, docs_per_shard: int, codebook: int, seed: int = 0) -> Path:
    """Documents like the quick start's: a caption or a short build-up (1-3 steps of text + an 8x8 code grid)."""
    from mmgen.data.code_shards import CodedDoc, CodeShardWriter
    from mmgen.data.doc import Doc, Image, Text

    rng = np.random.default_rng(seed)
    with CodeShardWriter(out, max_docs=docs_per_shard) as w:
        for _ in range(n_docs):
            items, codes = [], {}
            for _ in range(int(rng.integers(1, 4))):
                c, s, p = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))], PLACES[rng.integers(9)]
                items.append(Text(f"add a {c} {s} at the {p}."))
                codes[len(items)] = rng.integers(0, codebook, size=(8, 8)).astype(np.int16)
                items.append(Image(path=f"<codes:{len(items)}>", format="png"))
            w.write(CodedDoc(Doc(items=items), codes=codes))
    return out


def train_overrides(
    out_dir: Path, codes: Path, codebook: int, steps: int, source: str, packed: Path | None
) -> list[str]:
    over = {
        "data.code_shards": codes,
        "data.image_tokenizer": "null",
        "data.codebook_size": codebook,
        "out_dir": out_dir,
        "steps": steps,
        "save_every": steps,
        "log_every": steps,
        "tensorboard": "false",
        "progress": "false",
        "threads": 1,
        "data.source": source,
        "resume": "false",
    }
    if packed is not None:
        over["data.packed_shards"] = packed
    return [f"{k}={v}" for k, v in over.items()]


def train_run(
    work: Path, name: str, codes: Path, codebook: int, steps: int, source: str, packed: Path | None = None
) -> dict:
    """One training run in a fresh process (so its peak RSS is its own); the summary it wrote."""
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    t = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmgen.training.pretrain",
            "tiny_pretrain",
            *train_overrides(out, codes, codebook, steps, source, packed),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if p.returncode != 0:
        raise SystemExit(f"training run {name} failed:\n{p.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    s["wall_s"] = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return s


def data_path_ms(packed: Path, codes: Path, codebook: int, steps: int, blocks: int = 4) -> dict:
    """Milliseconds per optimizer step spent making the batches (rows, prompt dropout, masks), both paths
    in this process, interleaved in blocks: the data path's own cost, without the model's noise."""
    import torch

    from mmgen.data.packed_shards import read_index, read_packed_shard
    from mmgen.training.config import load_train_config
    from mmgen.training.data import MemoryBatches, StreamedBatches

    cfg = load_train_config("tiny_pretrain", train_overrides(packed / "unused", codes, codebook, 1, "memory", None))
    index = read_index(packed)
    shards = [read_packed_shard(s["path"]) for s in index["shards"]]
    rows = {k: np.concatenate([r[k] for r in shards]) for k in shards[0]}
    mem, stream = MemoryBatches(rows, cfg, 0, 1), StreamedBatches(index, cfg, 0, 1, None)
    times = {"memory": [], "packed": []}
    step = {"memory": 0, "packed": 0}
    for _ in range(blocks):
        for name, src in (("memory", mem), ("packed", stream)):
            t = time.perf_counter()
            for _ in range(steps // blocks):
                src.step(step[name], torch.float32, "mask")
                step[name] += 1
            times[name].append((time.perf_counter() - t) / (steps // blocks) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def scaled_corpus(packed: Path, dest: Path, factor: int) -> Path:
    """``factor`` copies of a packed corpus as hard links (falling back to symlinks across filesystems)."""
    from mmgen.data.packed_shards import shard_name
    from mmgen.data.packing import PackStats

    index = json.loads((packed / "index.json").read_text())
    dest.mkdir(parents=True)
    shutil.copytree(packed / "text_tokenizer", dest / "text_tokenizer")
    shutil.copy(packed / "vocab.json", dest / "vocab.json")
    shards = []
    for _ in range(factor):
        for s in index["shards"]:
            name = shard_name(len(shards))
            try:
                os.link(packed / s["name"], dest / name)
            except OSError:
                os.symlink(packed / s["name"], dest / name)
            shards.append({**s, "name": name})
    packing = index["totals"]["packing"]
    totals = {**index["totals"], "packing": PackStats.total([packing] * factor, packing["seq_len"]).to_dict()}
    (dest / "index.json").write_text(json.dumps({**index, "totals": totals, "shards": shards}))
    return dest


def tokenize_arms(work: Path, n_shards: int, docs_per_shard: int) -> tuple[list, dict]:
    """docs/s of mmgen tokenize with 1 and 2 local workers and 2 Ray workers, on the same Doc shards."""
    import torch

    from mmgen.data.shards import write_shards
    from mmgen.tokenizers.pretokenize import pretokenize
    from mmgen.tokenizers.vq import PixelVQ
    from mmgen.world.documents import generate_world

    torch.manual_seed(0)
    PixelVQ(resolution=(64, 64), codebook_size=512).eval().save_pretrained(work / "vq")
    docs = [doc for doc, _ in generate_world(n_shards * docs_per_shard, seed=0, mix={"caption": 1.0})]
    write_shards(docs, work / "docs", max_docs=docs_per_shard)
    write_shards(docs[:2], work / "docs_startup", max_docs=1)
    results, bytes_of = [], {}
    for executor, workers in (("local", 1), ("local", 2), ("ray", 2)):
        out = work / f"tok_{executor}_{workers}"
        if executor == "ray":  # one cluster for both runs: the first starts its workers, the second finds them warm
            import ray

            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()  # the executor's start-up: workers importing torch and loading the tokenizer
        pretokenize(
            work / "vq",
            str(work / "docs_startup"),
            work / f"startup_{executor}_{workers}",
            progress=False,
            executor=executor,
            workers=workers,
        )
        startup = time.perf_counter() - t
        t = time.perf_counter()
        s = pretokenize(
            work / "vq", str(work / "docs"), out, batch_size=64, progress=False, executor=executor, workers=workers
        )
        dt = time.perf_counter() - t
        if executor == "ray":
            ray.shutdown()
        # a local pool starts again for every run: its start-up is taken off; Ray's workers were already up
        warm = dt if executor == "ray" else dt - startup
        bytes_of[(executor, workers)] = {Path(p).name: Path(p).read_bytes() for p in s["shards"]}
        results.append(
            {
                "executor": executor,
                "workers": workers,
                "docs": s["docs_in"],
                "images": s["images_encoded"],
                "seconds": dt,
                "docs_per_s": s["docs_in"] / dt,
                "startup": startup,
                "net_docs_per_s": s["docs_in"] / max(1e-9, warm),
            }
        )
        print(f"tokenize {executor} x{workers}: {s['docs_in']} docs in {dt:.1f} s", flush=True)
    ref = bytes_of[("local", 1)]
    same = {f"{e} x{w}": b == ref for (e, w), b in bytes_of.items()}
    return results, same


def main(argv=None) -> int:
    from mmgen.utils.bench import md_table, write_section

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10000, help="documents of the demo-sized synthetic corpus")
    ap.add_argument("--docs-per-shard", type=int, default=1250)
    ap.add_argument("--codes", help="real code shards instead of synthetic ones (with --codebook)")
    ap.add_argument("--codebook", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60, help="steps of each side-by-side run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data-steps", type=int, default=400, help="steps of the in-process data path timing")
    ap.add_argument("--scales", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--scale-steps", type=int, default=10)
    ap.add_argument("--tokenize-shards", type=int, default=6)
    ap.add_argument("--tokenize-docs-per-shard", type=int, default=800)
    ap.add_argument("--work", help="scratch directory (default: a temp dir, removed at the end)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    from mmgen.training.config import load_train_config
    from mmgen.training.pack import pack

    work = Path(args.work or tempfile.mkdtemp(prefix="mmgen_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        codes = (
            Path(args.codes)
            if args.codes
            else synthetic_code_shards(work / "codes", args.docs, args.docs_per_shard, args.codebook)
        )
        t = time.perf_counter()
        over = train_overrides(work / "unused", codes, args.codebook, 1, "memory", None)
        cfg = load_train_config("tiny_pretrain", over)
        index = pack("tiny_pretrain", over, work / "packed", progress=False)
        pack_s = time.perf_counter() - t
        totals = index["totals"]["packing"]
        print(f"packed {totals['docs']} docs into {totals['rows']} rows in {pack_s:.1f} s", flush=True)

        data_ms = data_path_ms(work / "packed", codes, args.codebook, args.data_steps)
        print(f"data path ms/step: {data_ms}", flush=True)
        side = {"memory": [], "packed": []}
        for r in range(args.rounds):  # interleaved, so load from other jobs hits both arms alike
            for source in ("memory", "packed"):
                s = train_run(
                    work,
                    f"{source}{r}",
                    codes,
                    args.codebook,
                    args.steps,
                    source,
                    work / "packed" if source == "packed" else None,
                )
                side[source].append(s)
                print(
                    f"round {r} {source}: {s['tokens_per_s']:.0f} tok/s, first step {s['first_step_s']:.1f} s, "
                    f"peak RSS {s['peak_rss_mib_per_rank'][0]:.0f} MiB",
                    flush=True,
                )
        scaled = []
        for k in args.scales:
            d = scaled_corpus(work / "packed", work / f"packed_x{k}", k)
            s = train_run(work, f"x{k}", codes, args.codebook, args.scale_steps, "packed", d)
            scaled.append((k, s))
            print(
                f"x{k}: first step {s['first_step_s']:.1f} s, peak RSS {s['peak_rss_mib_per_rank'][0]:.0f} MiB",
                flush=True,
            )
            shutil.rmtree(d)
        tok_rows, same = tokenize_arms(work, args.tokenize_shards, args.tokenize_docs_per_shard)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def med(runs, key, sub=None):
        vals = [r[key][0] if sub == 0 else r[key] for r in runs]
        return statistics.median(vals)

    m_tps, p_tps = med(side["memory"], "tokens_per_s"), med(side["packed"], "tokens_per_s")
    rows = [
        [
            "in memory (data.source=memory)",
            "1x",
            f"{m_tps:.0f}",
            "1.00",
            f"{med(side['memory'], 'first_step_s'):.1f}",
            f"{med(side['memory'], 'peak_rss_mib_per_rank', 0):.0f}",
            side["memory"][0]["data"]["packing"]["fill_rate"],
        ],
        [
            "streamed (data.source=packed)",
            "1x",
            f"{p_tps:.0f}",
            f"{p_tps / m_tps:.3f}",
            f"{med(side['packed'], 'first_step_s'):.1f}",
            f"{med(side['packed'], 'peak_rss_mib_per_rank', 0):.0f}",
            side["packed"][0]["data"]["packing"]["fill_rate"],
        ],
    ]
    base_rss = med(side["packed"], "peak_rss_mib_per_rank", 0)
    base_first = med(side["packed"], "first_step_s")
    for k, s in scaled:
        rows.append(
            [
                "streamed (data.source=packed)",
                f"{k}x ({s['data']['packing']['rows']} rows)",
                f"{s['tokens_per_s']:.0f}",
                "",
                f"{s['first_step_s']:.1f}",
                f"{s['peak_rss_mib_per_rank'][0]:.0f} ({s['peak_rss_mib_per_rank'][0] / base_rss:.2f}x)",
                s["data"]["packing"]["fill_rate"],
            ]
        )
    t1 = tok_rows[0]["docs_per_s"]
    n1 = tok_rows[0]["net_docs_per_s"]
    tok_table = md_table(
        [
            "executor",
            "workers",
            "docs",
            "seconds",
            "docs/s",
            "vs 1 worker",
            "start-up (s)",
            "docs/s without start-up",
            "vs 1 worker",
            "shards identical to 1 worker",
        ],
        [
            [
                r["executor"],
                r["workers"],
                r["docs"],
                f"{r['seconds']:.1f}",
                f"{r['docs_per_s']:.1f}",
                f"{r['docs_per_s'] / t1:.2f}",
                f"{r['startup']:.1f}",
                f"{r['net_docs_per_s']:.1f}",
                f"{r['net_docs_per_s'] / n1:.2f}",
                same[f"{r['executor']} x{r['workers']}"],
            ]
            for r in tok_rows
        ],
    )
    rows_per_step = cfg.micro_batch * cfg.grad_accum  # one rank
    step_ms = rows_per_step * cfg.data.seq_len * side["memory"][0]["data"]["packing"]["fill_rate"] / m_tps * 1000
    per_round = {k: ", ".join(f"{s['tokens_per_s']:.0f}" for s in v) for k, v in side.items()}
    lo_first = min(base_first, *(s["first_step_s"] for _, s in scaled))
    hi_first = max(base_first, *(s["first_step_s"] for _, s in scaled))
    corpus = (
        "code shards " + str(args.codes)
        if args.codes
        else f"{args.docs} synthetic documents of the quick start size (1-3 steps of caption + 8x8 code grid)"
    )
    body = "\n".join(
        [
            f"Corpus: {corpus} "
            f"in {len(index['shards'])} code shards -> `mmgen pack` ({pack_s:.1f} s, 1 worker): {totals['docs']} "
            f"documents, {totals['rows']} rows of {totals['seq_len']} tokens, fill {totals['fill_rate']}. The tiny "
            f"recipe (`training/tiny_pretrain.yaml`, {rows_per_step} x {cfg.data.seq_len} tokens per step), one rank, "
            f"1 thread, each run a fresh process; {args.rounds} rounds of {args.steps} steps interleaved (memory, "
            "streamed, memory, ...), medians; tokens/s over all steps of a run; time to first step counts the "
            "process's start-up (imports, data, model, DeepSpeed). The scaled corpora "
            f"({', '.join(f'{k}x' for k in args.scales)}) are {args.scale_steps}-step runs on packed corpora whose "
            "shards are hard links to the 1x packed shards (each opened as its own file). The machine is shared with "
            "other jobs (2 cores): compare within this table, not across runs.",
            "",
            md_table(
                ["data path", "corpus", "tokens/s", "vs in memory", "time to first step (s)", "peak RSS (MiB)", "fill"],
                rows,
            ),
            "",
            f"Per-round tokens/s: memory {per_round['memory']}; streamed {per_round['packed']}. Time to first step of "
            f"the streamed runs ranges {lo_first:.1f}-{hi_first:.1f} s from 1x to {max(args.scales)}x.",
            "",
            f"The data path alone (batches of {args.data_steps} steps made in one process, both paths interleaved in 4 "
            f"blocks, median block; the model's step excluded): in memory {data_ms['memory']:.2f} ms/step, streamed "
            f"{data_ms['packed']:.2f} ms/step; a training step of this recipe took {step_ms:.0f} ms here (its "
            "non-padding tokens at the in-memory median tokens/s), so streaming adds "
            f"{100 * (data_ms['packed'] - data_ms['memory']) / step_ms:+.2f}% to a step.",
            "",
            f"`mmgen tokenize` on {tok_rows[0]['docs']} ShapesWorld caption documents in {args.tokenize_shards} Doc "
            "shards (64x64 images, a PixelVQ built from config). Start-up is a run of the same executor on a "
            "2-document input just before (workers importing torch and loading the tokenizer: a fixed cost, large on "
            "this loaded machine). Local: the pool starts again for every run, so seconds include a start-up, and the "
            "start-up column is taken off for the docs/s without it. Ray: one cluster (started by the benchmark) "
            "serves both runs, so the timed run finds its workers warm: its seconds exclude the start-up. Two workers "
            "share the machine's 2 cores with the other jobs on it:",
            "",
            tok_table,
        ]
    )
    print(body)
    if not args.no_write:
        write_section("scale", "Scale: streamed packed shards vs in-memory data; tokenization on executors", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
