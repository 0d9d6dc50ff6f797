"""FSDP against data parallel: the same GRPO updates on the same rollout, per rank, under torchrun.

A model with random weights built from a config.json (--config: a checkpoint folder's, or the tiny
default) takes --steps AdamW updates (grpo.grpo_update) on one fixed rollout batch of random tokens
with random rewards: each rank trains on its half (its share) of the groups. First with a whole copy
of the model on every rank (data parallel: gradients all-reduced), then sharded (--fsdp's
plumbing/parallel.shard), from the same starting weights. Rank 0 prints, for each mode:

- held MB: the bytes this rank holds of weights, gradients and AdamW's moments after the steps, next
  to the memory plan's figures for them (plumbing/memory.py);
- s/step: the median seconds of one update (sampling is not timed: it runs on the gathered model);
- max grad-norm diff and max weight diff between the two modes after the steps (float rounding).

    torchrun --nproc-per-node 2 benchmarks/bench_fsdp.py                  # tiny, CPU (gloo), seconds
    torchrun --nproc-per-node 2 benchmarks/bench_fsdp.py --config ~/models/SmolLM2-135M-Instruct  # its shape
    torchrun --nproc-per-node 4 benchmarks/bench_fsdp.py --config DIR --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from plumbing.memory import plan_memory  # noqa: E402
from plumbing.parallel import end_distributed, full_state_dict, setup_distributed, shard  # noqa: E402

TINY = dict(arch="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=32, qkv_bias=True, tie_word_embeddings=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a folder with config.json (default: a tiny Qwen2 shape)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute dtype (weights stay fp32)")
    p.add_argument("--prompts", type=int, default=4, help="groups in the batch, over all ranks")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    return p.parse_args(argv)


def rollout(cfg: ModelConfig, args, device) -> grpo.RolloutBatch:
    """One fixed batch: random prompts repeated over their group, random completions and rewards."""
    g = torch.Generator().manual_seed(0)
    n = args.prompts * args.samples
    prompts = torch.randint(0, cfg.vocab_size, (args.prompts, args.prompt_len), generator=g)
    completions = torch.randint(0, cfg.vocab_size, (n, args.completion_len), generator=g)
    index = torch.arange(args.prompts).repeat_interleave(args.samples)
    ids = torch.cat((prompts[index], completions), 1)
    full = torch.full((n,), args.prompt_len)
    return grpo.RolloutBatch(ids.to(device), full.to(device), torch.full((n,), args.completion_len, device=device),
                             torch.zeros(n, dtype=torch.bool, device=device), index.to(device),
                             torch.rand(n, generator=g).to(device))


def held_mb(tensors) -> float:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors) / 2**20


def run(mode: str, cfg: ModelConfig, part: grpo.RolloutBatch, args, dist, compute) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device if mode == "data parallel" else "cpu")
    if mode == "fsdp":
        shard(model, compute, args.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    gcfg = grpo.GRPOConfig(max_new_tokens=args.completion_len, micro_batch=args.micro_batch)
    times, norms = [], []
    for _ in range(args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=compute, enabled=compute != torch.float32):
            m = grpo.grpo_update(model, opt, part, gcfg, ranks=dist)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        norms.append(m["grad_norm"])
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    held = [held_mb(model.parameters()), held_mb(p.grad for p in model.parameters()), held_mb(moments)]
    return {"s_per_step": statistics.median(times), "held": held, "norms": norms, "weights": full_state_dict(model)}


def main(argv=None):
    args = parse_args(argv)
    dist = setup_distributed(args.device, fsdp=True)
    if args.prompts % dist.world:
        raise SystemExit(f"--prompts {args.prompts} must be divisible by the {dist.world} ranks")
    cfg = ModelConfig.from_hf(json.loads((Path(args.config) / "config.json").read_text())) if args.config \
        else ModelConfig(**TINY)
    compute = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batch = rollout(cfg, args, args.device)
    rows = (batch.prompt_index % dist.world) == dist.rank
    part = grpo.RolloutBatch(*(getattr(batch, f)[rows] for f in ("input_ids", "prompt_lengths", "completion_lengths",
                                                                 "truncated", "prompt_index", "rewards")))
    results = {mode: run(mode, cfg, part, args, dist, compute) for mode in ("data parallel", "fsdp")}
    if dist.rank == 0:
        n_rows = args.prompts * args.samples // dist.world
        print(f"{dist.world} ranks, {args.device}, compute {args.dtype}, {n_rows} rows of "
              f"{args.prompt_len}+{args.completion_len} tokens per rank, {args.steps} AdamW steps")
        print("| mode | weights MB (plan) | gradients MB (plan) | AdamW MB (plan) | s/step |")
        print("|---|---|---|---|---|")
        for mode, r in results.items():
            plan = plan_memory(cfg, weight_bytes=4, compute_bytes=compute.itemsize, rows=n_rows,
                               prompt_tokens=args.prompt_len, new_tokens=args.completion_len,
                               micro_batch=args.micro_batch, shards=dist.world if mode == "fsdp" else 1)
            planned = [plan.weights, plan.gradients, plan.optimizer]
            cells = " | ".join(f"{h:.1f} ({p / 2**20:.1f})" for h, p in zip(r["held"], planned))
            print(f"| {mode} | {cells} | {r['s_per_step']:.3f} |")
        a, b = results["data parallel"], results["fsdp"]
        norm_diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["norms"], b["norms"]))
        weight_diff = max((a["weights"][k].float() - b["weights"][k].float()).abs().max().item() for k in a["weights"])
        print(f"grad norms {['%.6g' % x for x in a['norms']]}; FSDP vs data parallel: max relative grad-norm "
              f"difference {norm_diff:.1e}, max weight difference {weight_diff:.1e}")
    end_distributed()


if __name__ == "__main__":
    main()
    # leave without the interpreter's teardown: gloo's threads can abort it ("terminate called without an
    # active exception") after the work is done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
