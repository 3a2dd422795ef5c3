"""Training throughput: mmgen's DeepSpeed trainer with packing versus a plain PyTorch loop with padding.

    python benchmarks/train_throughput.py                  # 600 ShapesWorld docs, rows of 512 and 1024, 2 rounds
    python benchmarks/train_throughput.py --docs 200 --steps 4 --no-write   # a quick look
    python benchmarks/train_throughput.py --code-grid 3 --seq-len 256 512 --precision fp32 bf16
        # pictures of 9 codes as the quick start's code blocks, rows of 256 and 512, bf16 autocast arms too

Both arms train the same tiny model (the ``tiny`` preset's Llama, built from config with the same
seed) on the same token sequences: ShapesWorld caption, QA and build-up documents (the mixture of
the tiny recipe without video and speech), images as 8x8 code grids of a pixel VQ built from config
(``--code-grid 3``: 3x3 grids, a picture as short as the quick start's code blocks make it),
text through a byte-level BPE trained on the documents.

(a) baseline: the Hugging Face model in a plain PyTorch loop (torch AdamW), batches of documents
    right-padded to the longest in the batch, a 2-D padding mask, pad labels ignored;
(b) mmgen: ``mmgen.training.trainer.pretrain`` (DeepSpeed ZeRO-2, first-fit-decreasing packing into
    ``seq_len`` rows, block-diagonal attention), reading code shards written once.

Each arm does the same number of optimizer steps with the same number of documents per step on
average (baseline batch = documents per packed row x rows per step). Reported: useful (non-pad)
tokens per second over the timed steps (the first steps are warm-up and not timed), their ratio, the
packing fill rate, and model FLOPs utilisation: 6 x parameters x useful tokens (+ attention) per
second over the measured peak of a large matmul here. The CPU is shared, so the arms run interleaved
(a, b, a, b) and each figure is the median over rounds, which spreads other jobs' load over both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model() -> dict:
    """The tiny preset's decoder shape, read from training/tiny_pretrain.yaml (what the quick start trains)."""
    from mmgen.config import load_config
    from mmgen.paths import recipe_path
    from mmgen.training.config import TrainConfig

    m = load_config(TrainConfig, recipe_path("tiny_pretrain", "training"), []).model
    return {"hidden": m.hidden, "layers": m.layers, "heads": m.heads}


MODEL = tiny_model()
MIX = {"caption": 0.5, "qa": 0.25, "buildup": 0.25}


def make_data(n_docs: int, work: Path, seed: int = 0, grid: int = 8):
    """ShapesWorld docs -> code shards (for the trainer) and token sequences (for the baseline)."""
    from mmgen.data.code_shards import CodedDoc, CodeShardWriter
    from mmgen.data.doc import Image
    from mmgen.models.text_tokenizer import train_text_tokenizer
    from mmgen.processing.sequence import build_sequences, doc_texts
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers.vq import PixelVQ
    from mmgen.world.documents import generate_world

    torch.manual_seed(seed)
    vq = PixelVQ(resolution=(8 * grid, 8 * grid), codebook_size=512).eval()  # grid x grid codes (downsample 8)
    coded = []
    for doc, _ in generate_world(n_docs, seed=seed, mix=MIX):
        idx = [i for i, it in enumerate(doc.items) if isinstance(it, Image)]
        codes = vq.encode([doc.items[i].to_pil() for i in idx]).numpy() if idx else []
        coded.append(CodedDoc(doc, codes={i: c for i, c in zip(idx, codes)}))
    shards = work / "codes"
    with CodeShardWriter(shards) as w:
        for cd in coded:
            w.write(cd)
    tok = train_text_tokenizer(doc_texts(coded), vocab_size=1000)
    tok.save_pretrained(work / "text_tokenizer")
    vocab = Vocab(len(tok), {"pix": vq.codebook_size}, max_grid=16)
    seqs, _ = build_sequences(coded, tok, vocab)
    return shards, tok, vocab, seqs, vq.codebook_size


def peak_flops(device: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (fp32 on CPU, bf16 on GPU): the machine's practical peak."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def baseline(seqs, vocab, tok, steps: int, warmup: int, batch_docs: int, device: str, seed: int) -> dict:
    """(a) right-padded batches in a plain loop; returns useful tokens/s over the timed steps."""
    from mmgen.data.packing import IGNORE_INDEX
    from mmgen.models.lm import build_tiny_lm

    model = build_tiny_lm(vocab, max_len=1024, text_tokenizer=tok, seed=seed, **MODEL).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    order = np.random.default_rng(seed).permutation(len(seqs))
    pad = tok.pad_token_id
    useful = padded = 0
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0, useful, padded = time.perf_counter(), 0, 0
        pick = [seqs[order[(step * batch_docs + j) % len(seqs)]] for j in range(batch_docs)]
        L = max(len(s["input_ids"]) for s in pick)
        ids = torch.full((len(pick), L), pad, dtype=torch.long)
        mask = torch.zeros((len(pick), L), dtype=torch.long)
        labels = torch.full((len(pick), L), IGNORE_INDEX, dtype=torch.long)
        for r, s in enumerate(pick):
            n = len(s["input_ids"])
            ids[r, :n] = torch.from_numpy(s["input_ids"])
            mask[r, :n] = 1
            labels[r, :n] = torch.where(torch.from_numpy(s["loss_mask"]), ids[r, :n], IGNORE_INDEX)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        useful += int(mask.sum())
        padded += ids.numel()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": useful / dt, "fill": useful / padded, "seconds": dt}


def mmgen_arm(
    shards,
    work: Path,
    codebook: int,
    steps: int,
    warmup: int,
    micro_batch: int,
    seq_len: int,
    device: str,
    seed: int,
    threads: int,
    precision: str = "fp32",
) -> dict:
    """(b) the trainer; its metrics.jsonl second window covers exactly the timed steps."""
    from mmgen.training.trainer import pretrain

    out = work / f"mmgen_{time.monotonic_ns()}"
    ds = "training/ds_zero2_gpu.json" if device == "cuda" else "training/ds_zero2_cpu.json"
    overrides = [
        f"data.code_shards={shards}",
        f"data.text_tokenizer={work / 'text_tokenizer'}",
        "data.image_tokenizer=null",
        f"data.codebook_size={codebook}",
        "data.max_grid=16",
        f"data.seq_len={seq_len}",
        "data.splits=[]",
        *(f"model.{k}={v}" for k, v in MODEL.items()),
        f"micro_batch={micro_batch}",
        "grad_accum=1",
        f"steps={warmup + steps}",
        f"log_every={warmup}",
        f"save_every={10**6}",
        "progress=false",
        "tensorboard=false",
        f"deepspeed={ds}",
        f"seed={seed}",
        f"out_dir={out}",
        "loss.prompt_dropout=0",
        f"threads={threads}",
        f"precision={precision}",
    ]
    if steps % warmup:
        raise SystemExit("--steps must be a multiple of --warmup (the trainer logs in windows of --warmup steps)")
    pretrain(None, overrides)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    timed = rows[1:]  # the first window is the warm-up
    tokens_per_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "tokens_per_s": tokens_per_s,
        "fill": summary["data"]["packing"]["fill_rate"],
        "packing": summary["data"]["packing"],
        "params": summary["parameters"],
    }


def model_flops_per_token(params: int, layers: int, hidden: int, ctx: float) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6N for the matmuls plus 12 * layers * hidden * ctx
    for attention scores over a context of ``ctx`` tokens (a document's own length when packed)."""
    return 6 * params + 12 * layers * hidden * ctx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per arm and round")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first (also the trainer's log window)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument(
        "--seq-len",
        type=int,
        nargs="+",
        default=[512, 1024],
        help="packed row lengths to measure (rows per step scale so tokens per step stay equal)",
    )
    ap.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="the trainer's precision (bf16: forward under autocast) for each row length",
    )
    ap.add_argument("--code-grid", type=int, default=8, help="image code grid side (8: pixel codes, 3: code blocks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="train_tp_"))
    try:
        shards, tok, vocab, seqs, codebook = make_data(args.docs, work, grid=args.code_grid)
        lengths = np.array([len(s["input_ids"]) for s in seqs])
        step_tokens = args.micro_batch * args.seq_len[0]
        batch_docs = max(1, round(step_tokens / lengths.mean() * 0.97))
        peak = peak_flops(args.device)
        arms = [(L, p) for L in args.seq_len for p in args.precision]
        base_runs, mm_runs = [], {arm: [] for arm in arms}
        for r in range(args.rounds):  # interleaved, so load from other jobs hits every arm alike
            base_runs.append(baseline(seqs, vocab, tok, args.steps, args.warmup, batch_docs, args.device, seed=r))
            for L, p in arms:
                mm_runs[L, p].append(
                    mmgen_arm(
                        shards,
                        work,
                        codebook,
                        args.steps,
                        args.warmup,
                        max(1, step_tokens // L),
                        L,
                        args.device,
                        seed=r,
                        threads=args.threads,
                        precision=p,
                    )
                )
            print(
                f"round {r}: baseline {base_runs[-1]['tokens_per_s']:.0f} tok/s, mmgen "
                + ", ".join(f"{mm_runs[arm][-1]['tokens_per_s']:.0f} {arm}" for arm in arms),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    b_tps = statistics.median(x["tokens_per_s"] for x in base_runs)
    params = mm_runs[arms[0]][0]["params"]
    ctx = float((lengths**2).sum() / lengths.sum())  # token-weighted mean document length
    fpt = model_flops_per_token(params, MODEL["layers"], MODEL["hidden"], ctx)
    rows = [
        [
            "(a) PyTorch loop, right-padded batches",
            f"{batch_docs} docs",
            f"{b_tps:.0f}",
            f"{statistics.median(x['fill'] for x in base_runs):.3f}",
            f"{100 * b_tps * fpt / peak:.2f}%",
            "1.00",
        ]
    ]
    packing_lines = []
    for (L, p), runs in mm_runs.items():
        m_tps = statistics.median(x["tokens_per_s"] for x in runs)
        if p == args.precision[0]:
            pack = runs[0]["packing"]
            packing_lines.append(
                f"rows of {L}: {pack['docs']} docs into {pack['rows']} rows, fill rate "
                f"{pack['fill_rate']:.3f}, {pack['docs_split']} split, {pack['docs_dropped']} dropped"
            )
        arm = f"packing into {L}" + (f", {p} autocast" if p != "fp32" else "")
        rows.append(
            [
                f"(b) mmgen trainer, DeepSpeed ZeRO-2 + {arm}",
                f"{max(1, step_tokens // L)} x {L}",
                f"{m_tps:.0f}",
                f"{runs[0]['fill']:.3f}",
                f"{100 * m_tps * fpt / peak:.2f}%",
                f"{m_tps / b_tps:.2f}",
            ]
        )
    body = "\n".join(
        [
            f"{len(seqs)} ShapesWorld documents (caption/QA/build-up, pictures as {args.code_grid}x{args.code_grid} "
            f"codes; {lengths.mean():.0f} tokens on average, "
            f"{lengths.min()}-{lengths.max()}), the tiny preset's Llama ({params / 1e6:.2f}M parameters), "
            f"{step_tokens} tokens per step in every arm, {args.steps} timed steps after {args.warmup} warm-up steps "
            f"per arm, {args.rounds} rounds run interleaved (a, b, b', a, b, b', ...) on a shared machine; medians "
            f"over rounds. Device: {args.device}, "
            f"{'bf16' if args.device == 'cuda' else 'fp32 unless the arm says bf16'}, {args.threads} threads. MFU "
            "counts FLOPs alike in every precision, over a float32 peak.",
            "",
            md_table(["arm", "batch", "useful tokens/s", "fill (non-pad share)", "MFU", "speed-up"], rows),
            "",
            "Packing (minimum bin slack): " + "; ".join(packing_lines) + ". "
            f"MFU = (6 x parameters + attention) FLOPs per useful token x useful tokens/s over the peak of a "
            f"2048^3 matmul measured here ({peak / 1e9:.1f} GFLOP/s).",
            "Per-round tokens/s: baseline "
            + ", ".join(f"{x['tokens_per_s']:.0f}" for x in base_runs)
            + "; "
            + "; ".join(
                f"mmgen {L} {p}: " + ", ".join(f"{x['tokens_per_s']:.0f}" for x in runs)
                for (L, p), runs in mm_runs.items()
            )
            + ".",
        ]
    )
    print(body)
    if not args.no_write:
        name = "train_throughput" if args.device == "cpu" else "train_throughput_gpu"
        title = "Training throughput: packing + DeepSpeed vs a padded PyTorch loop"
        if args.code_grid != 8:  # its own section: the pixel-code one stays
            name, title = f"{name}_grid{args.code_grid}", f"{title}, {args.code_grid}x{args.code_grid} code pictures"
        write_section(name, title + (" (GPU, bf16)" if args.device == "cuda" else ""), body)
    return 0


from mmgen.utils.bench import md_table, write_section  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
