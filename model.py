"""A hand-written decoder-only transformer that loads Hugging Face checkpoints, and its sampler.

Covers Qwen2/Qwen2.5 (bias on q/k/v), Llama 3.x and SmolLM2 (llama3 RoPE scaling), and Qwen3 (RMSNorm
on q and k, explicit head_dim). Parameter names mirror the Hugging Face ones minus the `model.` prefix,
so loading is a rename, never a permutation.

Simplifications, each on purpose:
- No sliding-window attention, no dual-chunk attention, no RoPE types besides default/linear/llama3:
  configs that ask for them are refused with an error instead of being run subtly wrong.
- forward() takes an optional KV cache (see sampling.py, which owns the cache and the decode loop).
- Prompts are right-padded: every row starts at position 0, so a batch of different lengths needs no
  position offsets in a full forward pass (attention is causal; padding only ever follows real tokens).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked (the message names the file)."""


# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    """The architecture hyper-parameters, read from (and written back to) a Hugging Face config.json."""

    arch: str = "qwen2"  # "qwen2" | "llama" | "qwen3"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", "factor": ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # Llama/Qwen3 `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @staticmethod
    def from_hf(cfg: dict, source: str = "config.json") -> "ModelConfig":
        """Parse a Hugging Face config dict; unsupported architectures or features raise CheckpointError."""
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = ARCHITECTURES.get(archs[0])
        if arch is None:
            raise CheckpointError(f"{source}: architecture {archs[0]!r} is not supported "
                                  f"(supported: {', '.join(ARCHITECTURES)})")
        if cfg.get("use_sliding_window") or cfg.get("dual_chunk_attention_config"):
            raise CheckpointError(f"{source}: sliding-window / dual-chunk attention is not supported")
        try:
            rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5 keeps theta in here
            scaling = cfg.get("rope_scaling") or {}
            theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            rope.update(scaling)
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "linear", "llama3"):
                raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported")
            n_heads = cfg["num_attention_heads"]
            attn_bias = bool(cfg.get("attention_bias", False))
            return ModelConfig(
                arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=n_heads, num_kv_heads=cfg.get("num_key_value_heads", n_heads),
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                rope_theta=float(theta),
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=cfg.get("tie_word_embeddings", arch != "llama"),
                qkv_bias=arch == "qwen2" or attn_bias, o_bias=arch != "qwen2" and attn_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
        except KeyError as e:
            raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The config.json that `transformers` reads back into the same architecture."""
        name = {v: k for k, v in ARCHITECTURES.items()}[self.arch]
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        out = {"architectures": [name], "model_type": self.arch, "vocab_size": self.vocab_size,
               "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
               "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
               "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
               "rope_theta": self.rope_theta, "rope_parameters": rope, "rms_norm_eps": self.rms_norm_eps,
               "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
               "max_position_embeddings": self.max_position_embeddings, "use_sliding_window": False,
               "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        if self.arch != "qwen2":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.rope_scaling:
            out["rope_scaling"] = dict(rope)
        return out


# -----------------------------------------------------------------------------
# The decoder


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 (as Hugging Face does, so bf16 matches)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) with linear or llama3 scaling applied (Llama 3.1 report)."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type") == "linear":
        return inv / sc["factor"]
    if sc.get("rope_type") == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def rotate_half(x):
    """The Hugging Face RoPE convention: pairs are (i, i + d/2), not interleaved (i, i+1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention; writes to / reads from a preallocated KV cache when given one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.arch == "qwen3":  # Qwen3 normalises each head's q and k before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv=None, slots=None, mask=None, prefix=None, keep=None):
        """x (B, T, C); cos/sin (B, 1, T, hd). kv: (k_cache, v_cache) each (B, nkv, S, hd).
        slots None: prefill (write slots 0..T-1, causal); else decode (T == 1, write slot slots[b]).
        prefix: (k, v) (B, nkv, S, hd) attended before x (shared-prompt training); keep: list that
        receives this call's (k, v) so a prompt pass can serve as the prefix of its completions."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if keep is not None:
            keep.append((k, v))
        if prefix is not None:
            k, v = torch.cat((prefix[0], k), 2), torch.cat((prefix[1], v), 2)
        if kv is not None:
            k_cache, v_cache = kv
            if slots is None:
                k_cache[:, :, :T], v_cache[:, :, :T] = k, v
            else:
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, slots] = k[:, :, 0].to(k_cache.dtype)  # (under autocast k may be fp32)
                v_cache[rows, :, slots] = v[:, :, 0].to(v_cache.dtype)
                k, v = k_cache[:, :, :mask.shape[-1]], v_cache[:, :, :mask.shape[-1]]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.nh != self.nkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv=None, slots=None, mask=None, prefix=None, keep=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, slots, mask, prefix, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The whole decoder. forward() returns final-normed hidden states; logits() applies the head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Tied weights: the lookup's gradient is kept sparse (one row per token instead of a zero-filled
        # V x C table) and autograd adds it to the head's dense gradient, so .grad still ends dense and
        # the backward writes one vocabulary-sized tensor instead of three (about 5% of a training step
        # at a 151k vocabulary on CPU: benchmarks/bench_model.py --profile). Every loss here goes through
        # logits(); one that never reaches the head would leave a sparse .grad, which AdamW refuses.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, sparse=cfg.tie_word_embeddings)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # small normal init (std 0.02, as the HF configs' initializer_range) for random test models
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., V) logits."""
        return F.linear(h, self.output_weight)

    def rope(self, positions: torch.Tensor, dtype):
        """positions (B, T) -> cos, sin (B, 1, T, hd), computed in fp32 then cast."""
        if self.inv_freq.dtype != torch.float32:  # model.to(bf16) casts buffers too, and bf16
            # frequencies put RoPE phases off by radians at long positions: rebuild them in fp32
            self.inv_freq = rope_inv_freq(self.config).to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids: torch.Tensor, positions=None, kv_cache=None, slots=None, mask=None,
                prefix=None, keep=None):
        """ids (B, T) -> hidden (B, T, C). Without a cache: causal attention over right-padded rows
        starting at position 0. With `kv_cache` (sampling.KVCache) see sampling.generate(); `prefix`
        and `keep` (per-layer lists) are used by forward_grouped()."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        x = self.embed_tokens(ids)
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            kv = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            args = (x, cos, sin, kv, slots, mask, None if prefix is None else prefix[i], keep)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.norm(x)

    def forward_grouped(self, prompt_ids, prompt_lens, completion_ids, prompt_index):
        """Training forward in which the G completions of a prompt share one pass over that prompt.

        prompt_ids (P, Tp) right-padded with lengths prompt_lens (P,); completion_ids (N, Tc) right-
        padded; prompt_index (N,) says which prompt each completion continues. Returns
        h_last (P, C), the hidden state at each prompt's last token (it predicts completion token 0),
        and h (N, Tc, C), where h[:, j] predicts completion token j + 1. Exactly equal to running each
        prompt + completion row on its own, with G times less work on the prompt.
        """
        keep: list = []
        hp = self(prompt_ids, keep=keep)  # (P, Tp, C); keep: per layer (k, v) of shape (P, nkv, Tp, hd)
        P, Tp = prompt_ids.shape
        h_last = hp[torch.arange(P, device=hp.device), prompt_lens - 1]
        prefix = [(k[prompt_index], v[prompt_index]) for k, v in keep]  # (N, nkv, Tp, hd), keeps grad
        N, Tc = completion_ids.shape
        lens = prompt_lens[prompt_index]  # (N,)
        positions = lens[:, None] + torch.arange(Tc, device=lens.device)  # completions resume there
        seen_prompt = torch.arange(Tp, device=lens.device)[None, None, :] < lens[:, None, None]  # (N, 1, Tp)
        causal = torch.ones(Tc, Tc, dtype=torch.bool, device=lens.device).tril()
        mask = torch.cat((seen_prompt.expand(N, Tc, Tp), causal.expand(N, Tc, Tc)), -1)[:, None]
        return h_last, self(completion_ids, positions=positions, mask=mask, prefix=prefix)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# Loading and saving (safetensors only: a pickle can run code, so it is never opened)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if pickles:
        raise CheckpointError(f"{path}: only pickle weights found ({', '.join(pickles)}); this project "
                              "loads safetensors only, because unpickling can run arbitrary code. Convert "
                              "them once with a tool you trust (e.g. transformers' save_pretrained).")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_config(path) -> ModelConfig:
    """Read `path/config.json` into a ModelConfig."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{f}: file not found")
    try:
        return ModelConfig.from_hf(json.loads(f.read_text()), str(f))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Build the model on the meta device and assign the checkpoint's tensors, strictly by name and shape."""
    from safetensors import safe_open

    path = Path(path)
    cfg = load_config(path)
    files = _weight_files(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, unexpected, bad_shape = {}, [], {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for name in sf.keys():
                key = name.removeprefix("model.")
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints store the head too; ours is the embedding
                if key not in expected:
                    unexpected.append(name)
                    continue
                shape = tuple(sf.get_slice(name).get_shape())
                if shape != tuple(expected[key]):
                    bad_shape[key] = f"{name} {shape} (expected {tuple(expected[key])})"
                    continue
                state[key] = sf.get_tensor(name).to(dtype)
    missing = sorted(set(expected) - set(state) - set(bad_shape))
    problems = [f"missing: {', '.join(missing)}"] * bool(missing) + \
        [f"unexpected: {', '.join(unexpected)}"] * bool(unexpected) + \
        [f"wrong shape: {', '.join(bad_shape.values())}"] * bool(bad_shape)
    if problems:
        raise CheckpointError(f"{path}: weights do not match config.json; " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers are not in the file: rebuild off meta
    return model.to(device).eval()


def replace_dir(tmp: Path, final: Path):
    """Move a fully written directory into place; a crash leaves either the old or the new one."""
    final = Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_model(model: Transformer, path, tokenizer_dir=None, extra_files: dict | None = None):
    """Write config.json + model.safetensors (+ tokenizer files) in the Hugging Face layout, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    state = {("" if k == "lm_head.weight" else "model.") + k: v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        from tokenizer import TOKENIZER_FILES
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, tmp / name)
    for name, payload in (extra_files or {}).items():
        (tmp / name).write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    replace_dir(tmp, path)
