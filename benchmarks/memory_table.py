"""The memory plan (plumbing/memory.py) of the paper's setting for Qwen2.5-0.5B / 1.5B / 7B-Instruct,
with each way of shrinking it, against GPUs of 24, 80 and 141 GB. No weights needed: the shapes are
those of the models' config.json files on the Hugging Face hub.

    python benchmarks/memory_table.py            # the README's table
    python benchmarks/memory_table.py --prompt-tokens 1500 --new-tokens 512

Workload: the paper's step (8 prompts x 8 samples), --max-new-tokens 1024, --micro-batch 8, beta 0,
bf16 compute; prompts of ~800 tokens (MovieLens prompts measured ~780 tokens with 10 + 10 history
entries). Per GPU: data parallel (torchrun) replicates all of it on every GPU; with --fsdp over N
GPUs each holds 1/N of the weights, gradients and AdamW, samples 1/N of the rows, and gathers the
whole model (in bf16) while sampling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig  # noqa: E402
from plumbing.memory import plan_memory  # noqa: E402

MODELS = {  # from each model's config.json
    "Qwen2.5-0.5B": ModelConfig(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True,
                                tie_word_embeddings=True),
    "Qwen2.5-1.5B": ModelConfig(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, qkv_bias=True,
                                tie_word_embeddings=True),
    "Qwen2.5-7B": ModelConfig(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True,
                              tie_word_embeddings=False),
}
VARIANTS = {  # name -> (weight bytes, LoRA rank, gradient checkpointing, FSDP ranks)
    "full fine-tuning (fp32 master weights)": (4, 0, False, 1),
    "--master-weights same": (2, 0, False, 1),
    "--master-weights same --grad-checkpointing": (2, 0, True, 1),
    "--lora-rank 16": (4, 16, False, 1),
    "--lora-rank 16 --grad-checkpointing": (4, 16, True, 1),
    "--fsdp --grad-checkpointing, 2 GPUs": (4, 0, True, 2),
    "--fsdp --grad-checkpointing, 4 GPUs": (4, 0, True, 4),
    "--fsdp --grad-checkpointing, 8 GPUs": (4, 0, True, 8),
    "--fsdp --master-weights same --grad-checkpointing, 4 GPUs": (2, 0, True, 4),
}
GPUS = (24, 80, 141)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=800)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rows", type=int, default=64, help="completions per step: prompts x samples")
    args = p.parse_args(argv)
    gb = 1e9  # GB, as GPUs are sold (a "24 GB" card), for every column
    print("| model | flags | weights GB | grads + AdamW GB | KV cache GB | activations GB | FSDP gathered GB "
          "| peak GB | " + " | ".join(f"{g} GB" for g in GPUS) + " |")
    print("|---" * (8 + len(GPUS)) + "|")
    rows = []
    for name, config in MODELS.items():
        for variant, (weight_bytes, rank, ckpt, shards) in VARIANTS.items():
            plan = plan_memory(config, weight_bytes=weight_bytes, compute_bytes=2, lora_rank=rank,
                               rows=args.rows // shards, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                               micro_batch=args.micro_batch, grad_checkpointing=ckpt, shards=shards)
            fit = " | ".join("fits" if plan.total <= g * gb else "no" for g in GPUS)
            print(f"| {name} ({plan.parameters / 1e9:.2f}B) | {variant} | {plan.weights / gb:.1f} | "
                  f"{(plan.gradients + plan.optimizer) / gb:.1f} | {plan.kv_cache / gb:.1f} | "
                  f"{(plan.activations + plan.largest_activation) / gb:.1f} | "
                  f"{max(plan.gathered_sampling, plan.gathered_update) / gb:.1f} | {plan.total / gb:.1f} | {fit} |")
            rows.append((name, variant, plan))
    return rows


if __name__ == "__main__":
    main()
