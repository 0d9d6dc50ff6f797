"""Sampling from the model: a preallocated KV cache and an explicit decode loop.

GRPO needs G completions of the same prompt. Each prompt is prefilled once and its KV cache copied
into its G rows (as nanochat does); decoding then computes logits at one position per row per step.

Simplifications:
- The cache is preallocated per generate() call and rows are never compacted: finished rows keep
  decoding a pad token. Simpler than a paged cache and fine for the G <= 16 samples GRPO needs.
- Prompts are right-padded, so every row starts at position 0; decoding writes each row's next
  token at that row's own slot and masks the slots it has not filled.
- The returned log-probs are those of the distribution actually sampled from (after temperature and
  top-k/top-p). GRPO scores tokens at the same temperature without truncation, so keep top_k=0 and
  top_p=1 for training rollouts, or the first importance ratio is not 1 (STYLE.md pitfall 2).
- Two CPU speed-ups, found with benchmarks/bench_model.py and exact up to fp32 rounding: tokens are
  drawn by inverse CDF (sample_tokens) instead of torch.multinomial, and the head of a few decode
  rows is computed as W @ h^T (head_logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import ModelConfig, Transformer

@dataclass
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 256
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

    @property
    def stop_reason(self) -> list[str]:
        return ["length" if t else "stop" for t in self.truncated.tolist()]

    def completions(self) -> list[list[int]]:
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


@dataclass
class KVCache:
    """Per-layer key/value tensors (B, nkv, S, hd) and each row's number of filled slots."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # (B,)

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, size: int, dtype, device) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
        return KVCache([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                       [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                       torch.zeros(batch, dtype=torch.long, device=device))

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row copied n times (row i -> rows i*n .. i*n+n-1): one prefill serves G samples."""
        return KVCache([k.repeat_interleave(n, 0) for k in self.k], [v.repeat_interleave(n, 0) for v in self.v],
                       self.lengths.repeat_interleave(n, 0))


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
    """(N, C) hidden states at each row's last position -> (N, V) fp32 logits, as model.logits(h).
    The 151k-row head is most of a decode step. For a few rows MKL's fp32 GEMM runs ~2x faster as
    W @ h^T than as h @ W^T (what F.linear asks for): measured 8 rows 126 vs 238 ms; equal at ~64 rows."""
    w = model.output_weight
    if h.device.type == "cpu" and h.dtype == torch.float32 and h.shape[0] <= 32:
        return (w @ h.T).T.contiguous()
    return model.logits(h).float()


def sample_tokens(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, V) log-probs -> (N,) one token per row, drawn by inverse CDF: one uniform number per row,
    located in the row's cumulative distribution (fp64, so it equals exp(logp) to ~1e-16).
    Same distribution as torch.multinomial, which on CPU draws one exponential per vocabulary entry:
    10x slower: ~40 ms a step for 8 rows x 151k tokens on one core, where the 0.5B-shape decode
    step itself takes ~200 ms."""
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
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((P, int(lens.max())), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)

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
    slots = torch.arange(cache.k[0].shape[2], device=device)
    for t in range(T):
        logits = last.float()
        if cfg.temperature > 0:
            logp = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).log_softmax(-1)
            nxt = sample_tokens(logp, generator)
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
        # Decode: each row writes its token at its own next slot and attends to its filled slots only
        pos = cache.lengths
        mask = (slots[: int(pos.max()) + 1][None, :] <= pos[:, None])[:, None, None, :]  # (N, 1, 1, S)
        h = model(nxt[:, None], positions=pos[:, None], kv_cache=cache, slots=pos, mask=mask)
        cache.lengths = pos + 1
        last = head_logits(model, h[:, -1])
    width = max(int(lengths.max()), 1)
    return Generation(tokens[:, :width], lengths, logps[:, :width], ~done,
                      torch.arange(P, device=device).repeat_interleave(G))
