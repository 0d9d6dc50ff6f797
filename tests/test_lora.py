"""Tests for lora.py and --lora-rank: the adapted model starts as the base model, only adapters train,
merged and unmerged weights give the same outputs, a LoRA checkpoint is a plain Hugging Face folder,
and a LoRA run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import PROMPTS, full_logits, tiny_model

import grpo
import lora
import train
from plumbing.checkpoints import load_adapters, load_model, save_model


def lora_model(rank=4, alpha=8.0, seed=0, trained=True):
    """A tiny Qwen2 with adapters; `trained` gives B random values, as after some training steps."""
    model = tiny_model(seed)
    lora.add_lora(model, rank, alpha)
    if trained:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, lora.LoRALinear):
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


def test_update_by_hand():
    """h = W0 x + (alpha / r) B A x on a 2 -> 2 layer with rank 1, numbers worked out by hand."""
    base = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    layer = lora.LoRALinear(base, rank=1, alpha=2.0)  # scale 2
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[0.5], [-1.0]]))
    x = torch.tensor([[3.0, 4.0]])
    # W0 x = (3, 8); A x = 7; B A x = (3.5, -7); scaled by 2: (7, -14) -> (10, -6)
    torch.testing.assert_close(layer(x), torch.tensor([[10.0, -6.0]]))
    # merged: W0 + 2 B A = [[1, 0], [0, 2]] + 2 [[0.5, 0.5], [-1, -1]] = [[2, 1], [-2, 0]]
    merged = lora.merged_state_dict({f"p.{k}": v for k, v in layer.state_dict().items()}, layer.scale)
    assert list(merged) == ["p.weight"]
    torch.testing.assert_close(merged["p.weight"], torch.tensor([[2.0, 1.0], [-2.0, 0.0]]))


@torch.no_grad()
def test_at_init_the_adapted_model_is_the_base_model():
    base, adapted = tiny_model(0), lora_model(trained=False)
    assert torch.equal(full_logits(base, PROMPTS[0]), full_logits(adapted, PROMPTS[0]))


def test_only_adapters_change_after_a_grpo_step():
    """Every base weight (embeddings, norms, projections) is frozen; every adapter moves."""
    model = lora_model(trained=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = grpo.RolloutBatch(ids, torch.tensor([6, 6, 5, 5]), torch.tensor([6, 4, 7, 3]),
                              torch.zeros(4, dtype=torch.bool), torch.tensor([0, 0, 1, 1]),
                              torch.tensor([1.0, 0.0, 0.2, 0.9]))
    grpo.grpo_update(model, torch.optim.AdamW(trainable, lr=1e-2), batch, grpo.GRPOConfig())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert moved == adapters and len(adapters) == 2 * 7 * 2  # A and B, 7 projections, 2 layers


@torch.no_grad()
def test_merged_and_unmerged_forward_agree(tmp_path):
    """The adapted model, and the merged weights saved and loaded back as a plain model, give the same
    logits; the saved folder has no adapter names in model.safetensors, and the adapters beside it."""
    model = lora_model()
    save_model(model, tmp_path / "m")
    plain = load_model(tmp_path / "m")
    assert not lora.has_lora(plain)
    # W0 x + s B A x and (W0 + s B A) x differ only in fp32 rounding order
    torch.testing.assert_close(full_logits(plain, PROMPTS[1]), full_logits(model, PROMPTS[1]), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config == {"r": 4, "lora_alpha": 8.0, "target_modules": sorted(lora.TARGETS)}
    again = tiny_model(0)
    lora.add_lora(again, 4, 8.0)
    load_adapters(tmp_path / "m", again)
    assert torch.equal(full_logits(again, PROMPTS[1]), full_logits(model, PROMPTS[1]))


@torch.no_grad()
def test_lora_checkpoint_loads_in_transformers_with_the_merged_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = lora_model()
    save_model(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([PROMPTS[2]])
    assert (hf(ids).logits[0] - full_logits(model, PROMPTS[2])).abs().max() <= 1e-4


def test_a_lora_run_trains_adapters_and_resumes_exactly(tmp_path, monkeypatch):
    """RecOne with --lora-rank on a (tiny, demo-trained) checkpoint: SFT and GRPO train adapters only,
    checkpoints are plain folders with the adapters beside them, and a resumed run takes the steps an
    uninterrupted one took."""
    from tiny_runs import TINY, metrics, varied_rewards

    varied_rewards(monkeypatch)

    base = tmp_path / "base"
    train.main(TINY + ["--out", str(base), "--steps", "1"])  # a "pretrained" model with our tokenizer
    flags = TINY + ["--model", str(base / "cold_start"), "--lora-rank", "4", "--lora-alpha", "8",
                    "--sft-lr", "1e-3", "--lr", "1e-3", "--max-user-history", "6", "--max-item-history", "6",
                    "--system-prompt", "short", "--history-fields", "Categories", "--mark-shared", "on"]
    train.main(flags + ["--out", str(tmp_path / "whole"), "--steps", "3"])
    train.main(flags + ["--out", str(tmp_path / "cut"), "--steps", "1"])
    train.main(["--resume", str(tmp_path / "cut" / "checkpoint"), "--steps", "3"])
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert sorted(b) == [1, 2, 3]
    for step in (2, 3):
        assert a[step]["grad_norm"] > 0
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-6)
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], abs=1e-6)
    ckpt = tmp_path / "whole" / "checkpoint"
    assert (ckpt / "adapter_model.safetensors").exists() and not lora.has_lora(load_model(ckpt))
    start, end = load_model(base / "cold_start"), load_model(ckpt)  # the merged weights did move
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), end.parameters()))


def test_adapters_are_drawn_from_the_seed():
    """The same seed gives the same A in every process (a run is reproducible from --seed), another differs."""
    def first_a(seed):
        model = tiny_model(0)
        lora.add_lora(model, 4, 8.0, seed=seed)
        return next(m for m in model.modules() if isinstance(m, lora.LoRALinear)).lora_A.detach().clone()

    torch.manual_seed(123)  # the global generator must not matter
    a = first_a(0)
    torch.manual_seed(456)
    assert torch.equal(a, first_a(0)) and not torch.equal(a, first_a(1))
