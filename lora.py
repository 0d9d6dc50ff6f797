"""LoRA: train a low-rank update of chosen linear layers instead of the whole model.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3: a frozen weight W0
(out x in) gets an update B A of rank r, scaled by alpha / r:

    h = W0 x + (alpha / r) B A x,    A: (r, in), B: (out, r)

A starts random and B at zero, so at initialisation the model is exactly the base model, and only A
and B (here fp32) are trained and kept by AdamW: for a 7B model at rank 16 on the seven projections of
every block that is ~40M parameters instead of 7.6B. Saving merges W = W0 + (alpha / r) B A, so a
checkpoint stays a plain Hugging Face folder; the adapters are also written on their own.

Simplifications: no dropout on the adapter's input (the paper's experiments used none for GPT-3);
biases, norms, embeddings and the output head stay frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus its trainable low-rank update (LoRA eq. 3)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        device = base.weight.device
        A = torch.empty(rank, base.in_features, dtype=torch.float32, device="meta" if device.type == "meta" else "cpu")
        if device.type != "meta":  # drawn on the CPU from a seeded generator: the same adapters on any device
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # nn.Linear's own init, as PEFT does
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # B A x, in fp32
        return self.base(x) + (self.scale * update).to(x.dtype)  # LoRA eq. 3


def add_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS, seed: int = 0) -> list[nn.Parameter]:
    """Freeze `model` and wrap every nn.Linear named in `targets` with a LoRALinear whose A is drawn
    from a generator seeded with `seed`; returns the adapter parameters (the only ones left trainable)."""
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, generator))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"LoRA: no linear layer named {', '.join(targets)} in the model")
    return [p for p in model.parameters() if p.requires_grad]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """From the state dict of a model with adapters (scale = alpha / r), the one it would have
    without them: every wrapped weight merged, W0 + scale B A (LoRA eq. 3), in W0's dtype."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base.weight"):
            prefix = key.removesuffix("base.weight")
            delta = scale * (state[prefix + "lora_B"].float() @ state[prefix + "lora_A"].float())
            value = (value.float() + delta).to(value.dtype)
        merged[key.replace(".base.", ".")] = value
    return merged


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapters of a state dict: {'layers.0.self_attn.q_proj.lora_A': (r, in), ...}."""
    return {k: v for k, v in state.items() if ".lora_" in k}


def adapter_config(model: nn.Module) -> dict:
    """What a reader of the saved adapters needs to rebuild them."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})
    rank = layers[0].lora_A.shape[0]
    return {"r": rank, "lora_alpha": layers[0].scale * rank, "target_modules": names}
