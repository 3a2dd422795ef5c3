"""How PyTorch's CPU threads wait, on a quiet machine and on one another process keeps busy.

    python benchmarks/omp_wait.py [--threads 2] [--steps 30] [--rounds 3]

PyTorch's CPU kernels run on GNU OpenMP threads, which by default spin for a while when they wait for
each other. When another process keeps a core busy, the spinning thread holds the core its partner needs
and every parallel region waits for the scheduler. mmgen sets ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep
while they wait) when it is imported, before torch loads, unless the variable is already set.

Each arm is a fresh process (the policy is read when the OpenMP runtime loads) that trains the tiny
recipe's LM shape (a 2-layer Llama of 128, 8 rows of 256 tokens) for ``--steps`` steps after 10 warm-up
steps at ``--threads`` threads; "busy" runs a one-thread matmul loop in another process meanwhile. The
arms alternate within each round. Writes the "OpenMP wait policy" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEP = r"""
import json, os, sys, time
import torch
from mmgen.utils.compat import ensure_torchvision
ensure_torchvision()
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1100, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x = torch.randint(0, 1100, (8, 256))
for i in range(10 + int(sys.argv[2])):
    if i == 10:
        t = time.perf_counter()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
print(json.dumps({"ms": (time.perf_counter() - t) / int(sys.argv[2]) * 1000}))
"""

BUSY = r"""
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = (a @ a).tanh()
"""


def arm(policy: str | None, busy: bool, threads: int, steps: int) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    load = subprocess.Popen([sys.executable, "-c", BUSY], env=env) if busy else None
    try:
        if load:
            time.sleep(1.0)
        # -c, not -m mmgen: importing mmgen would set the policy this arm leaves unset
        out = subprocess.run(
            [sys.executable, "-c", STEP, str(threads), str(steps)], env=env, capture_output=True, text=True, check=True
        )
    finally:
        if load:
            load.kill()
            load.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from mmgen.utils.bench import write_section

    arms = [(p, b) for b in (False, True) for p in (None, "PASSIVE")]
    ms: dict = {a: [] for a in arms}
    for r in range(args.rounds):
        for a in arms if r % 2 == 0 else arms[::-1]:
            ms[a].append(arm(*a, args.threads, args.steps))
            print(a, f"{ms[a][-1]:.0f} ms/step", flush=True)
    med = {a: sorted(v)[len(v) // 2] for a, v in ms.items()}
    lines = [
        f"The tiny recipe's LM shape (2 layers of 128, 8 x 256 tokens), {args.threads} threads, {args.steps} steps "
        f"after 10 warm-up steps, {args.rounds} rounds (median; each round runs every arm in a fresh process).",
        "",
        "| machine | OpenMP's default (spin) | PASSIVE (mmgen's default) | default / PASSIVE |",
        "| --- | ---: | ---: | ---: |",
    ]
    for busy, name in ((False, "quiet"), (True, "another process busy on one core")):
        d, p = med[(None, busy)], med[("PASSIVE", busy)]
        lines.append(f"| {name} | {d:.0f} ms/step | {p:.0f} ms/step | **{d / p:.2f}x** |")
    lines.append("")
    lines.append(
        "Per-round ms/step: "
        + "; ".join(
            f"{'busy' if b else 'quiet'} {p or 'default'}: " + ", ".join(f"{x:.0f}" for x in ms[(p, b)])
            for p, b in arms
        )
        + "."
    )
    write_section("omp_wait", "OpenMP wait policy: training beside another busy process", "\n".join(lines))


if __name__ == "__main__":
    main()
