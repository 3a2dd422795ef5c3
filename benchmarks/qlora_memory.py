"""QLoRA (``lora.quantize``) against plain LoRA: weight memory, and SFT step time on this machine.

    python benchmarks/qlora_memory.py               # tiny preset + a Qwen2.5-0.5B-shaped decoder (4 layers)
    python benchmarks/qlora_memory.py --no-write    # print only

Each model is built from config with the same seed by the trainer's own ``build_model`` (SFT stage,
LoRA r=16 on q/k/v/o), once with ``lora.quantize=none`` (the baseline) and once each with ``4bit``
(NF4, double quantization, fp32 compute) and ``8bit`` (LLM.int8). Reported: the bytes the weights
take (``training.qlora.parameter_bytes``: parameters and buffers plus bitsandbytes' quantization constants),
their ratio to the baseline, and the same for the decoder's Linear layers alone (the part QLoRA
quantizes; embeddings, heads and projectors stay full precision). Step time: forward, backward and
AdamW step on one batch of 4 x 512 random tokens, arms interleaved over rounds, median per arm,
reported as a ratio to LoRA (the CPU is shared and absolute seconds move between runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgen.utils.bench import md_table, write_section  # noqa: E402

QWEN_05B_4L = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 4,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}
MODELS = {
    "tiny preset (hidden 256, 4 layers, text 1000 + pix 512)": (
        {"model.hidden": 256, "model.layers": 4, "model.heads": 4},
        1000,
    ),
    "Qwen2.5-0.5B shape, 4 of 24 layers (text 151936 + pix 512)": ({"model.base_config": QWEN_05B_4L}, 151936),
}


def build(model_over: dict, text_size: int, quantize: str):
    from mmgen.processing.vocab import Vocab
    from mmgen.training.config import load_train_config
    from mmgen.training.model_setup import build_model

    over = {
        "init_from": "null",
        "data.code_shards": "unused",
        "data.seq_len": 512,
        "lora.enabled": "true",
        "lora.quantize": quantize,
        **model_over,
    }
    cfg = load_train_config("tiny_sft", [f"{k}={v}" for k, v in over.items()])
    vocab = Vocab(text_size, {"pix": 512}, max_grid=16)
    return build_model(cfg, vocab, None), vocab


def linear_bytes(model) -> int:
    """Bytes of the decoder's Linear layers (the LoRA-wrapped base layers included), adapters excluded."""
    import bitsandbytes as bnb

    from mmgen.training.qlora import parameter_bytes

    # peft's LoRA wrappers are also called Linear/Linear4bit: only the layers themselves, by class.
    total = 0
    for name, m in model.named_modules():
        base = type(m) is torch.nn.Linear or isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        if base and ".lm.model.layers." in f".{name}" and "lora_" not in name:
            total += parameter_bytes(m)
    return total


def step_seconds(model, vocab, rounds_out: list, batch: int = 4, seq: int = 512) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab.size, (batch, seq), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    rounds_out.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from mmgen.training.qlora import parameter_bytes

    mem_rows, speed_rows = [], []
    for label, (over, text_size) in MODELS.items():
        arms = {q: build(over, text_size, q) for q in ("none", "4bit", "8bit")}
        base_all, base_lin = parameter_bytes(arms["none"][0]), linear_bytes(arms["none"][0])
        row = [label, f"{base_all / 2**20:.2f} MiB", f"{base_lin / 2**20:.2f} MiB"]
        for q in ("4bit", "8bit"):
            m = arms[q][0]
            row += [
                f"{parameter_bytes(m) / 2**20:.2f} MiB ({base_all / parameter_bytes(m):.2f}x)",
                f"{linear_bytes(m) / 2**20:.2f} MiB ({base_lin / linear_bytes(m):.2f}x)",
            ]
        mem_rows.append(row)
        print(row, flush=True)
        if "tiny" not in label:
            continue
        times = {q: [] for q in arms}
        for m, vocab in arms.values():
            step_seconds(m, vocab, [])  # warm-up
        for _ in range(args.rounds):
            for q, (m, vocab) in arms.items():
                step_seconds(m, vocab, times[q])
        med = {q: statistics.median(v) for q, v in times.items()}
        for q in arms:
            speed_rows.append(
                [
                    label,
                    "LoRA (fp32 base)" if q == "none" else f"QLoRA {q}",
                    f"{med[q]:.3f}",
                    f"{med[q] / med['none']:.2f}",
                ]
            )
        print(speed_rows[-3:], flush=True)

    body = (
        "Weight bytes of the SFT model (LoRA r=16 on q/k/v/o) as built by `training.model_setup.build_model`: plain "
        "LoRA "
        '(fp32 base) against QLoRA. "Decoder Linear" is the part bitsandbytes quantizes; embeddings, the '
        "output head and projectors stay fp32, which is why the whole-model ratio of a small-hidden, "
        "large-vocab model stays far below the 4-bit ratio of its layers.\n\n"
        + md_table(
            [
                "model",
                "LoRA: all weights",
                "LoRA: decoder Linear",
                "QLoRA 4bit: all",
                "QLoRA 4bit: decoder Linear",
                "QLoRA 8bit: all",
                "QLoRA 8bit: decoder Linear",
            ],
            mem_rows,
        )
        + f"\n\nSFT step (forward + backward + AdamW, 4 x 512 tokens, median of {args.rounds} interleaved rounds): "
        "bitsandbytes 0.50's CPU backend runs a fused 4-bit GEMM forward but dequantizes each weight for the "
        "backward matmul, and trains 8-bit through MatMul8bitFp (no fast int8 kernels on CPU, its source says), "
        "so on this CPU QLoRA buys memory with time. Not measured on a GPU here.\n\n"
        + md_table(["model", "arm", "seconds / step", "ratio to LoRA"], speed_rows)
    )
    print(body)
    if not args.no_write:
        write_section("qlora_memory", "QLoRA: weight memory and step time against LoRA", body)


if __name__ == "__main__":
    main()
