"""The memory plan against the resident memory a CPU run really reaches, phase by phase.

    python benchmarks/memory_rss.py --model ~/models/SmolLM2-135M-Instruct --dtype fp32   # then --dtype bf16
    python benchmarks/memory_rss.py --quick                                  # a tiny random model (the tests)

For each compute dtype, one process loads the model the way train.py does (fp32 master weights; bf16 by
autocast), prints the plan train.py would print for these settings, then runs one phase at a time and
records the process's peak resident memory (VmHWM, which only grows) after each: a greedy evaluation
batch of 64 prompts, one cold-start SFT batch (8 rows, micro-batch 4) and one GRPO step (6 prompts x 8
samples, micro-batch 4). The table gives each phase's peak beside the plan's total for it (the plan's
`evaluation` for the evaluation, its `total` for training), and their ratio. Prompts are random tokens
of the real run's length (MovieLens prompts of the README recipe: ~330 tokens; traces ~100).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo  # noqa: E402
from model import ModelConfig, SamplingConfig, Transformer, generate  # noqa: E402
from plumbing.checkpoints import load_config, load_model  # noqa: E402
from plumbing.memory import GiB, host_bytes, plan_memory  # noqa: E402
from train import sft_loss  # noqa: E402


def peak() -> int:
    """This process's peak resident memory so far, in bytes (Linux: VmHWM)."""
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no /proc/self/status: this measurement needs Linux")


def measure(model_dir: str | None, dtype: torch.dtype, prompt: int, new: int, threads: int) -> list[tuple]:
    """(phase, measured peak, planned bytes) for one compute dtype, in one process."""
    torch.set_num_threads(threads)
    config = load_config(model_dir) if model_dir else ModelConfig(arch="llama", vocab_size=300, hidden_size=64,
                                                                   intermediate_size=128, num_layers=2,
                                                                   num_heads=4, num_kv_heads=2, head_dim=16)
    host = host_bytes()
    plan = plan_memory(config, weight_bytes=4, compute_bytes=dtype.itemsize, rows=48, prompt_tokens=prompt,
                       new_tokens=new, micro_batch=4, eval_rows=64, host=host, cpu=True)
    model = load_model(model_dir, torch.float32, "cpu") if model_dir else Transformer(config)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    with autocast:
        model.eval()
        generate(model, [ids(prompt) for _ in range(64)], SamplingConfig(max_new_tokens=new, temperature=0.0))
        rows.append(("greedy evaluation, 64 prompts", peak(), plan.evaluation))
        model.train()
        batch = [(ids(prompt), ids(new)) for _ in range(8)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        for k in range(0, 8, 4):
            sft_loss(model, batch[k:k + 4], 8 * new, 1, 0.0, 0, "cpu")
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.clear_autocast_cache()
        rows.append(("one SFT batch, 8 rows, micro-batch 4", peak(), plan.total))
        model.eval()
        prompts = [ids(prompt) for _ in range(6)]
        gen = generate(model, prompts, SamplingConfig(max_new_tokens=new, temperature=1.0), 8, g)
        model.train()
        rollout = grpo.rollout_batch(prompts, gen, torch.rand(48, generator=g).tolist())
        grpo.grpo_update(model, opt, rollout, grpo.GRPOConfig(max_new_tokens=new, micro_batch=4))
        rows.append(("one GRPO step, 6 x 8 samples, micro-batch 4", peak(), plan.total))
    return [("before loading weights", host, plan.host)] + rows, plan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a checkpoint directory (default with --quick: a tiny random model)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--prompt", type=int, default=330)
    p.add_argument("--new", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny random model, short prompts")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.prompt, args.new = None, 16, 8
    elif not args.model:
        p.error("--model is needed without --quick")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows, plan = measure(args.model, dtype, args.prompt, args.new, args.threads)
    print(f"{args.dtype} compute, fp32 weights; plan: training peak {plan.total / GiB:.2f} GiB, evaluation "
          f"{plan.evaluation / GiB:.2f} GiB\n")
    print("| phase | measured peak RSS GiB | plan GiB | measured / plan |\n|---|---|---|---|")
    for name, got, want in rows:
        print(f"| {name} | {got / GiB:.2f} | {want / GiB:.2f} | {got / want:.2f} |")
    return rows


if __name__ == "__main__":
    main()
