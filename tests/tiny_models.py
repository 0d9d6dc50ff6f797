"""Tiny random models and prompts shared by test_model.py and test_sampling.py (no transformers needed)."""

from __future__ import annotations

import torch

from model import ModelConfig, Transformer
from sampling import SamplingConfig

VOCAB = 300
# three prompts of different lengths, so one batch has right padding of 0, 4 and 10 tokens
PROMPTS = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (13, 9, 3)]
GREEDY = SamplingConfig(max_new_tokens=32, temperature=0.0)


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.2):
    """Re-draw every weight with a larger std than the default 0.02 so logits are far from uniform
    (argmax ties would make greedy comparisons meaningless); norm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if "norm" in name else noise)
    return module


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random 2-layer model of our own (no transformers needed)."""
    cfg = dict(arch="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return randomise(Transformer(ModelConfig(**{**cfg, **overrides})), seed).eval()


def right_pad(prompts, pad=0):
    ids = torch.full((len(prompts), max(map(len, prompts))), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    return ids


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """(T, V) fp32 logits of one unpadded sequence from a single forward pass (no cache)."""
    return model.logits(model(torch.tensor([ids])))[0].float()
