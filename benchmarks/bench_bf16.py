"""fp32 against bf16 on this CPU: one GRPO step and one cold-start SFT batch of SmolLM2-135M-shaped weights.

What `--dtype auto` chooses on a CPU depends on whether it has bf16 matrix units (Intel AMX, AVX512-BF16):
with them a bf16 matmul runs several times faster than fp32, without them it is emulated and slower.
This script measures both on the machine it runs on, side by side in one process, from the same random
weights (no download), in the setting train.py uses for bf16: fp32 master weights, bf16 autocast.

Three settings from the same weights: fp32; bf16 autocast over fp32 master weights (`--dtype bf16`, the
default `--master-weights fp32`); bf16 weights (`--dtype bf16 --master-weights same`, no casts).

- GRPO step: sampling 2 prompts x 8 completions of 96 new tokens after 256-token prompts (model.generate),
  then grpo.grpo_update on those 16 rows (micro-batch 8, AdamW); sampling and update timed apart;
- SFT batch: forward + backward of 8 rows of 352 tokens (train.sft_loss) and one AdamW step;
- the largest difference between the fp32 and bf16-autocast logits of one 256-token sequence;
- with --profile, where the bf16-autocast update spends its time, by operator (self CPU time).

    python benchmarks/bench_bf16.py                 # SmolLM2-135M's 30 layers, 2 threads (minutes)
    python benchmarks/bench_bf16.py --profile       # and the bf16 update's operators
    python benchmarks/bench_bf16.py --quick         # tiny sizes (the test suite runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo  # noqa: E402
from model import ModelConfig, SamplingConfig, Transformer, generate  # noqa: E402
from plumbing.stages import cpu_bf16_units  # noqa: E402
from train import sft_loss  # noqa: E402

SMOLLM2_135M = dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0)
QUICK = dict(SMOLLM2_135M, vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def grpo_step(model, prompt_len: int, new_tokens: int, seed: int = 0, profile: bool = False):
    """Seconds for one GRPO step, (sampling, update): 2 prompts x 8 samples, then the update. profile:
    also the update's operator table (torch.profiler), else None."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, model.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    model.eval()
    gen = generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens, temperature=1.0), 8, g)
    sampled = time.perf_counter()
    rewards = torch.rand(len(gen.lengths), generator=g).tolist()
    batch = grpo.rollout_batch(prompts, gen, rewards)
    model.train()
    with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
        grpo.grpo_update(model, optimizer, batch, grpo.GRPOConfig(max_new_tokens=new_tokens, micro_batch=8))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) if profile else None
    return sampled - start, time.perf_counter() - sampled, table


def sft_batch(model, length: int, seed: int = 0) -> float:
    """Seconds for one SFT batch of 8 rows (a quarter of each is the completion), with its AdamW step."""
    g = torch.Generator().manual_seed(seed)
    rows = [(torch.randint(3, model.config.vocab_size, (length - length // 4,), generator=g).tolist(),
             torch.randint(3, model.config.vocab_size, (length // 4,), generator=g).tolist()) for _ in range(8)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    model.train()
    n_trace = sum(len(c) for _, c in rows)
    sft_loss(model, rows, n_trace, 1, 0.0, 0, "cpu")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than SmolLM2's 30 (a faster look)")
    p.add_argument("--profile", action="store_true", help="also print the bf16 update's operators by self CPU time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape, (prompt_len, new_tokens, sft_len) = (QUICK, (16, 8, 32)) if args.quick else (SMOLLM2_135M, (256, 96, 352))
    shape = dict(shape, num_layers=args.layers or shape["num_layers"])
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**shape)).eval()
    results, profile = {}, None
    settings = (("fp32", torch.float32, False), ("bf16 autocast", torch.float32, True),
                ("bf16 weights", torch.bfloat16, False))
    for name, weights, autocast in settings:
        model = Transformer(ModelConfig(**shape))
        model.load_state_dict(base.state_dict())  # the same weights
        model.to(weights)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            sampling, update, table = grpo_step(model, prompt_len, new_tokens, profile=args.profile and autocast)
            results[name] = (sampling, update, sampling + update, sft_batch(model, sft_len))
            torch.clear_autocast_cache()
        profile = table or profile
        del model
    ids = torch.randint(3, shape["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = base.logits(base(ids)).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = base.logits(base(ids)).float()
    diff = (fp32 - bf16).abs().max().item()
    found = cpu_bf16_units()
    units = f"bf16 matrix units: {', '.join(found)}" if found else "no bf16 matrix units"
    print(f"{cpu_name()} ({units}), {args.threads} threads, {shape['num_layers']} layers:\n")
    print("| workload | fp32 s | bf16 autocast s | bf16 weights s | fp32 / autocast | fp32 / bf16 weights |\n"
          "|---|---|---|---|---|---|")
    labels = ("GRPO step: sampling 16 completions", "GRPO step: the update", "one GRPO step, whole",
              "one SFT batch (8 rows)")
    for k, label in enumerate(labels):
        a, b, c = (results[name][k] for name, _, _ in settings)
        print(f"| {label} | {a:.2f} | {b:.2f} | {c:.2f} | {a / b:.2f}x | {a / c:.2f}x |")
    print(f"\nlargest |fp32 - bf16| logit over one {prompt_len}-token sequence: {diff:.3f} "
          f"(logits span {fp32.min().item():.1f} to {fp32.max().item():.1f})")
    if profile:
        print("\nthe bf16-autocast update, by operator:\n" + profile)
    return results, diff


if __name__ == "__main__":
    main()
