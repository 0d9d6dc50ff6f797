"""The model a GRPO step runs: a hand-written decoder-only transformer, its sampler and its tokenizer.

The decoder covers Qwen2/Qwen2.5 (bias on q/k/v), Llama 3.x and SmolLM2 (llama3 RoPE scaling) and
Qwen3 (RMSNorm on each head's q and k, explicit head_dim), read from a Hugging Face `config.json`.
Parameter names mirror the Hugging Face ones minus the `model.` prefix, so loading a checkpoint
(plumbing/checkpoints.py) is a rename, never a permutation.

- RMSNorm computes its statistics in fp32; RoPE uses the Hugging Face `rotate_half` convention with
  default, linear or llama3 frequency scaling; attention is grouped-query through
  `scaled_dot_product_attention`; the MLP is SwiGLU; the head is tied or untied.
- forward() returns hidden states; logits() applies the head only where it is asked (the last
  position when decoding, completion positions when training). forward_grouped() runs each prompt
  once for all the completions that continue it: GRPO's G samples share their prompt's pass.
- generate() samples: each prompt is prefilled once into a preallocated KV cache that is copied to
  its G rows (as nanochat does), then one token per row per step, with temperature, top-p, top-k or
  greedy decoding and per-row stop tokens. It returns the tokens and the log-probs of the
  distribution they were drawn from.

Simplifications, each on purpose:
- No sliding-window or dual-chunk attention and no RoPE types besides default/linear/llama3: configs
  that ask for them are refused with an error instead of being run subtly wrong.
- Sequences are right-padded: every row starts at position 0, so a full forward pass needs no
  position offsets (attention is causal; padding only ever follows real tokens). Decoding writes each
  row's next token at that row's own cache position and masks the positions it has not filled.
- The KV cache is preallocated per generate() call and rows are never compacted: finished rows keep
  decoding a pad token. Simpler than a paged cache and fine for the G <= 16 samples GRPO needs.
- Four exact speed-ups, each labelled where it stands and tested equal to the plain computation:
  forward_grouped (each prompt's pass shared by its G completions: the class docstring); with a tied
  head, the embedding lookup's gradient kept sparse (Transformer.__init__);
  sample_tokens draws by inverse CDF what sample_plain draws with torch.multinomial, which on a CPU
  draws one exponential per vocabulary entry (~40 ms a decode step for 8 rows x 151k tokens on one
  core, 10x slower, where the 0.5B-shape step itself takes ~200 ms); head_logits computes the head of
  a few decode rows as W @ h^T, which MKL's fp32 GEMM runs ~2x faster than h @ W^T (what F.linear
  asks for: 8 rows 126 vs 238 ms, equal at ~64 rows; the 151k-row head is most of a decode step).
  Each was found with benchmarks/bench_model.py.
- The tokenizer (Tokenizer) reads a checkpoint's tokenizer.json through the `tokenizers` library (the
  same Rust code `transformers` uses), special tokens from tokenizer_config.json and stop ids from
  generation_config.json. Chat formatting is hand-written for two families instead of running each
  model's Jinja template: "chatml" (Qwen2.5, SmolLM2, our demo model) and "llama3" (Llama 3.x
  headers); the tests check both against the templates' own output. Templates that insert extra text
  (a default system message when none is given, Llama 3.1's knowledge-date lines) are not
  reproduced: always pass a system message, as this project does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from torch import nn
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
    def from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
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
            for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim"):
                value = cfg[key] if key not in ("num_key_value_heads", "head_dim") else cfg.get(key)
                if value is not None and not (type(value) is int and value > 0):
                    raise CheckpointError(f"{source}: field {key!r} must be a positive integer, not {value!r}")
            n_heads = cfg["num_attention_heads"]
            n_kv = cfg.get("num_key_value_heads") or n_heads
            if n_heads % n_kv:
                raise CheckpointError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                                      f"num_key_value_heads {n_kv}")
            if not cfg.get("head_dim") and cfg["hidden_size"] % n_heads:
                raise CheckpointError(f"{source}: hidden_size {cfg['hidden_size']} is not a multiple of "
                                      f"num_attention_heads {n_heads} (and no head_dim is given)")
            for key, value in (("rope_theta", theta), ("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6))):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise CheckpointError(f"{source}: field {key!r} must be a positive number, not {value!r}")
            attn_bias = bool(cfg.get("attention_bias", False))
            return ModelConfig(
                arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=n_heads, num_kv_heads=n_kv,
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
    """Grouped-query attention; writes to / reads from a preallocated KV cache when given one.

    forward(x, cos, sin, kv, cache_pos, mask, prefix, return_kv): kv is (k_cache, v_cache), each
    (B, nkv, S, hd). With cache_pos None it prefills (writes cache positions 0..T-1, causal); else it
    decodes (T == 1: row b writes its token at cache position cache_pos[b]). prefix: (k, v), each
    (B, nkv, S, hd), attended before x (the shared prompt of forward_grouped). return_kv also returns
    this call's (k, v), so a prompt pass can serve as the prefix of its completions (returned, not
    appended to a list the caller passes in: FSDP's hooks rebuild argument containers, and an appended
    item would be lost)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.arch == "qwen3":  # Qwen3 normalises each head's q and k before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv=None, cache_pos=None, mask=None, prefix=None, return_kv=False):
        """x (B, T, C); cos/sin (B, 1, T, hd) -> (B, T, C) (see the class docstring for the rest)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        new_kv = (k, v.contiguous()) if return_kv else None  # not a view: FSDP warns about returned views
        if prefix is not None:
            k, v = torch.cat((prefix[0], k), 2), torch.cat((prefix[1], v), 2)
        if kv is not None:
            k_cache, v_cache = kv
            if cache_pos is None:
                k_cache[:, :, :T], v_cache[:, :, :T] = k, v
            else:
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, cache_pos] = k[:, :, 0].to(k_cache.dtype)  # (under autocast k may be fp32)
                v_cache[rows, :, cache_pos] = v[:, :, 0].to(v_cache.dtype)
                k, v = k_cache[:, :, :mask.shape[-1]], v_cache[:, :, :mask.shape[-1]]
        if x.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or v.dtype != torch.float32):
            y = cpu_attention(q, k, v, mask, self.nh != self.nkv)  # speed-up: fp32 kernels on a CPU
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.nh != self.nkv)
        out = self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        return (out, new_kv) if return_kv else out


def cpu_attention(q, k, v, mask, gqa: bool):
    """Speed-up of scaled_dot_product_attention on a CPU computing in 16 bits (equal up to rounding):
    torch's bf16 attention kernel there is slower than its fp32 one, 5.7x for a decoding step even with
    the casts (benchmarks/bench_bf16.py), so attend in fp32, outside autocast (which would cast back),
    and return the 16-bit dtype the next layer computes in. q (B, H, T, hd); k, v (B, Hkv, S, hd)."""
    low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else v.dtype
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=gqa)
    return y.to(low)


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

    def forward(self, x, cos, sin, kv=None, cache_pos=None, mask=None, prefix=None, return_kv=False):
        a = self.self_attn(self.input_layernorm(x), cos, sin, kv, cache_pos, mask, prefix, return_kv)
        a, new_kv = a if return_kv else (a, None)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, new_kv) if return_kv else x


class Transformer(nn.Module):
    """The whole decoder. forward() returns final-normed hidden states; logits() applies the head.

    forward(ids) runs causal attention over right-padded rows starting at position 0; with `kv_cache`
    (a KVCache) it prefills or decodes for generate(); `prefix` (a per-layer list of (k, v)) and
    return_kv (then it returns (hidden, that list)) serve forward_grouped().

    forward_grouped(prompt_ids, prompt_lens, completion_ids, prompt_index) is an exact speed-up of
    running each prompt + completion row through forward() on its own (grpo.token_logprobs): the G
    completions of a prompt share one pass over that prompt, G times less prompt work. prompt_ids
    (P, Tp) right-padded with lengths prompt_lens (P,); completion_ids (N, Tc) right-padded;
    prompt_index (N,) says which prompt each completion continues. It returns h_last (P, C), the
    hidden state at each prompt's last token (it predicts completion token 0), and h (N, Tc, C),
    where h[:, j] predicts completion token j + 1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Speed-up, exact: with tied weights the lookup's gradient is kept sparse (one row per token instead
        # of a zero-filled V x C table; the plain version is sparse=False) and autograd adds it to the head's
        # dense gradient, so .grad still ends dense and the backward writes one vocabulary-sized tensor
        # instead of three (about 5% of a training step at a 151k vocabulary on CPU: bench_model.py
        # --profile). tests/test_model.py checks the gradients against transformers' dense ones. Every loss
        # here goes through logits(); one that never reaches the head would leave a sparse .grad.
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

    def forward(self, ids: torch.Tensor, positions=None, kv_cache=None, cache_pos=None, mask=None,
                prefix=None, return_kv=False):
        """ids (B, T) -> hidden (B, T, C) (the class docstring says what the other arguments do)."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        x = self.embed_tokens(ids)
        cos, sin = self.rope(positions, x.dtype)
        kvs = []
        for i, layer in enumerate(self.layers):
            kv = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            args = (x, cos, sin, kv, cache_pos, mask, None if prefix is None else prefix[i], return_kv)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
            if return_kv:
                x, layer_kv = x
                kvs.append(layer_kv)
        return (self.norm(x), kvs) if return_kv else self.norm(x)

    def forward_grouped(self, prompt_ids, prompt_lens, completion_ids, prompt_index):
        """Speed-up, exact: (h_last (P, C), h (N, Tc, C)), each prompt's pass shared by its completions."""
        # self.forward, not self(): under FSDP this method is itself the hooked entry point
        # (plumbing/parallel.py), and a nested hooked call would free the weights on its way out
        hp, prompt_kv = self.forward(prompt_ids, return_kv=True)  # (P, Tp, C); per layer (k, v) (P, nkv, Tp, hd)
        P, Tp = prompt_ids.shape
        h_last = hp[torch.arange(P, device=hp.device), prompt_lens - 1]
        prefix = [(k[prompt_index], v[prompt_index]) for k, v in prompt_kv]  # (N, nkv, Tp, hd), keeps grad
        N, Tc = completion_ids.shape
        lens = prompt_lens[prompt_index]  # (N,)
        positions = lens[:, None] + torch.arange(Tc, device=lens.device)  # completions resume there
        seen_prompt = torch.arange(Tp, device=lens.device)[None, None, :] < lens[:, None, None]  # (N, 1, Tp)
        causal = torch.ones(Tc, Tc, dtype=torch.bool, device=lens.device).tril()
        mask = torch.cat((seen_prompt.expand(N, Tc, Tp), causal.expand(N, Tc, Tc)), -1)[:, None]
        return h_last, self.forward(completion_ids, positions=positions, mask=mask, prefix=prefix)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# The tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja", "special_tokens_map.json")


class Tokenizer:
    """tokenizer.json through `tokenizers`, special tokens and stop ids from the config files.

    Chat formatting is hand-written for the two families we support ("chatml": Qwen2.5, SmolLM2,
    our demo model; "llama3": Llama 3.x headers) and equals what their templates print for
    system/user/assistant turns; `chat_format` is guessed from the template text.
    """

    def __init__(self, path):
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise CheckpointError(f"{path / 'tokenizer.json'}: file not found")
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a plain Exception for a cut or malformed file
            raise CheckpointError(f"{path / 'tokenizer.json'}: unreadable ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        template = cfg.get("chat_template") or ""
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        self.chat_format = "llama3" if "<|start_header_id|>" in template else "chatml"
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        stops = gen.get("eos_token_id", [])
        stops = set(stops if isinstance(stops, list) else [stops])
        turn_end = "<|im_end|>" if self.chat_format == "chatml" else "<|eot_id|>"
        for t in (self.eos_token, turn_end):
            if t and self.tok.token_to_id(t) is not None:
                stops.add(self.tok.token_to_id(t))
        if not stops:
            raise CheckpointError(f"{path}: no eos token in tokenizer_config.json or generation_config.json")
        self.stop_ids = tuple(sorted(stops))
        # The token that closes an assistant turn in the chat format: what SFT teaches the model to end
        # a trace with. Not min(stop_ids): Qwen2.5 stops on [<|im_end|>, <|endoftext|>] and Llama 3 on
        # [<|end_of_text|>, <|eot_id|>], but their chat templates close a turn with <|im_end|> / <|eot_id|>.
        turn_end_id = self.tok.token_to_id(turn_end)
        eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.turn_end_id = next(i for i in (turn_end_id, eos_id, self.stop_ids[0]) if i is not None)
        pad = _token_text(cfg.get("pad_token"))
        self.pad_id = self.tok.token_to_id(pad) if pad and self.tok.token_to_id(pad) is not None \
            else self.stop_ids[0]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def check_fits(self, embedding_rows: int, path) -> None:
        """Refuse a tokenizer whose ids reach past the model's embedding (an IndexError at the first
        forward pass otherwise). Fewer tokens than rows is normal: vocabularies are padded."""
        if self.vocab_size > embedding_rows:
            raise CheckpointError(f"{path}: the tokenizer has {self.vocab_size} tokens but the model's embedding "
                                  f"only {embedding_rows} rows (config.json vocab_size): a tokenizer from another "
                                  "model?")

    def encode(self, text: str) -> list[int]:
        # special tokens are written into the text by the chat format, so none are added here
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Format [{"role", "content"}, ...] as the model's chat template would."""
        if self.chat_format == "llama3":
            out = self.bos_token or "<|begin_of_text|>"
            for m in messages:
                out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _read_json(f: Path) -> dict:
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def _token_text(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


# -----------------------------------------------------------------------------
# Sampling


@dataclass
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()


@dataclass
class Generation:
    """N = prompts x samples rows, prompt-major. tokens/logprobs (N, T) padded with pad_id / 0."""

    tokens: torch.Tensor
    lengths: torch.Tensor  # (N,) generated tokens, including the stop token when there is one
    logprobs: torch.Tensor  # log-prob of each token under the distribution it was drawn from
    truncated: torch.Tensor  # (N,) bool: hit max_new_tokens without a stop token
    prompt_index: torch.Tensor  # (N,) which prompt each row continues

    def completions(self) -> list[list[int]]:
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


@dataclass
class KVCache:
    """Per-layer key/value tensors (B, nkv, S, hd) and each row's number of filled positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # (B,)

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, size: int, dtype, device) -> KVCache:
        shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
        return KVCache([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                       [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                       torch.zeros(batch, dtype=torch.long, device=device))

    def repeat_rows(self, n: int) -> KVCache:
        """Each row copied n times (row i -> rows i*n .. i*n+n-1): one prefill serves G samples."""
        if n == 1:  # greedy evaluation: a copy would hold the whole cache twice
            return self
        return KVCache([k.repeat_interleave(n, 0) for k in self.k], [v.repeat_interleave(n, 0) for v in self.v],
                       self.lengths.repeat_interleave(n, 0))


def right_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, L) right-padded with pad_id, lengths (B,)). Masks are built from the
    lengths, never from `ids == pad_id` (the pad id is often the stop token, which is trained on)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    ids = torch.full((len(rows), max(int(lengths.max()), 1)), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    return ids, lengths


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(N, V) -> (N, V) with tokens outside the top-k / top-p nucleus set to -inf.
    top-p keeps the smallest set of most likely tokens whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # a token stays when the mass strictly before it is still below top_p (so the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def head_logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """Speed-up of model.logits(h).float() (equal up to fp32 rounding): (N, C) -> (N, V) fp32 logits."""
    w = model.output_weight
    if h.device.type == "cpu" and h.dtype == torch.float32 and h.shape[0] <= 32:
        return (w @ h.T).T.contiguous()
    return model.logits(h).float()


def sample_plain(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, V) log-probs -> (N,) one token per row, drawn from exp(logp)."""
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)


def sample_tokens(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Speed-up of sample_plain, the same distribution: one uniform number per row, found in the row's
    cumulative distribution (fp64, equal to exp(logp) to ~1e-16). (N, V) log-probs -> (N,) tokens."""
    cdf = logp.exp().double().cumsum(-1)  # (N, V); flat across filtered (-inf) tokens
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator) * cdf[:, -1:]
    nxt = torch.searchsorted(cdf, u, right=True).squeeze(1)  # first index whose cdf exceeds u: p > 0
    over = nxt == cdf.shape[1]
    if bool(over.any()):  # u rounded up to the total (odds ~2^-53): take the row's most likely token
        nxt = torch.where(over, logp.argmax(-1), nxt)
    return nxt


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], cfg: SamplingConfig, num_samples: int = 1,
             generator: torch.Generator | None = None, pad_id: int | None = None) -> Generation:
    """Sample `num_samples` continuations of each prompt. Each prompt is prefilled once and its KV cache
    copied to its samples; decoding then runs one token per step for all rows, logits at one position."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt, and no empty prompt")
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    if torch.is_autocast_enabled(device.type):  # fp32 master weights, bf16 compute: cache in bf16
        dtype = torch.get_autocast_dtype(device.type)
    pad = pad_id if pad_id is not None else (cfg.stop_ids[0] if cfg.stop_ids else 0)
    P, G, T = len(prompts), num_samples, cfg.max_new_tokens
    ids, lens = right_pad(prompts, pad, device)

    # Prefill: right-padded prompts, causal attention, keep only each row's last real hidden state
    cache = KVCache.empty(model.config, P, int(lens.max()) + T, dtype, device)
    h = model(ids, kv_cache=cache)
    last = head_logits(model, h[torch.arange(P, device=device), lens - 1])  # (P, V)
    cache.lengths = lens
    cache, last = cache.repeat_rows(G), last.repeat_interleave(G, 0)  # (N, ...)
    N = P * G

    tokens = torch.full((N, T), pad, dtype=torch.long, device=device)
    logps = torch.zeros(N, T, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    stop = torch.tensor(cfg.stop_ids, device=device, dtype=torch.long)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    cache_positions = torch.arange(cache.k[0].shape[2], device=device)
    for t in range(T):
        logits = last.float()
        if cfg.temperature > 0:
            logits = logits / cfg.temperature
            if cfg.top_k or cfg.top_p < 1.0:  # the nucleus of the tempered distribution
                logits = filter_logits(logits, cfg.top_k, cfg.top_p)
            logp = logits.log_softmax(-1)
            nxt = sample_tokens(logp, generator)  # as sample_plain(logp, generator), 10x faster on a CPU
        else:
            logp = logits.log_softmax(-1)
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens[:, t] = nxt
        logps[:, t] = torch.where(done, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
        lengths += (~done).long()
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or t == T - 1:
            break
        # Decode: each row writes its token at its own next cache position and attends to the
        # positions it has filled only
        pos = cache.lengths
        mask = (cache_positions[: int(pos.max()) + 1][None, :] <= pos[:, None])[:, None, None, :]  # (N, 1, 1, S)
        h = model(nxt[:, None], positions=pos[:, None], kv_cache=cache, cache_pos=pos, mask=mask)
        cache.lengths = pos + 1
        last = head_logits(model, h[:, -1])
    width = max(int(lengths.max()), 1)
    return Generation(tokens[:, :width], lengths, logps[:, :width], ~done,
                      torch.arange(P, device=device).repeat_interleave(G))
