"""Tiny random models and prompts shared by test_model.py and test_sampling.py (no transformers needed)."""

from __future__ import annotations

import torch

from model import ModelConfig, SamplingConfig, Transformer

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


def tiny_model(seed: int = 0, std: float | None = 0.2, **overrides) -> Transformer:
    """A random 2-layer Qwen2 of our own (no transformers needed): the shapes of a real one at a toy
    size. std: the weights' spread (see randomise); None keeps the model's own small init."""
    cfg = dict(arch="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**cfg, **overrides}))
    return (randomise(model, seed, std) if std is not None else model).eval()


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """(T, V) fp32 logits of one unpadded sequence from a single forward pass (no cache)."""
    return model.logits(model(torch.tensor([ids])))[0].float()
