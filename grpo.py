"""GRPO: sample a group of completions per prompt, score them, and push up the better-than-average ones.

The algorithm (DeepSeekMath §4.1, as used by RecZero), in the order this file is written and with the
step numbers of the README and of train.py:
  1-2. rollout(): sample G completions per prompt, score each with the task's reward function.
  3.   group_advantages(): compare each completion with the others of its group (no value model:
       the group mean is the baseline).
  4.   token_logprobs(): log-probabilities of the sampled tokens under the policy being trained.
  5.   clipped_surrogate() (+ kl_estimate()): the PPO-style per-token loss.
  6.   aggregation_weights(): how per-token losses are averaged into one number.
  7.   grpo_update(): gradients over micro-batches, clipping, AdamW; mu passes per rollout batch.

Choices and simplifications:
- beta = 0 by default, as in the RecZero paper: no KL term, so no reference model is built or run.
  With beta > 0 the KL of the policy from the reference is estimated per token (k1, k2 or k3).
- Advantages use the unbiased (Bessel, n - 1) std of each group and eps = 1e-6, like verl's
  `torch.std`. A group of size 1 gets advantage 0 (verl instead divides the raw reward by 1 + eps):
  one sample has nothing to be compared with. A group whose rewards are all equal also gets exactly
  0, and the share of such groups is reported, since they give no gradient at all.
- Loss aggregation defaults to "token-mean" over the whole optimizer batch (verl's default, used by
  the paper's code); "seq-mean-token-mean" (original GRPO) and "seq-mean-token-sum-norm" (Dr. GRPO)
  are the other values of the same option. Each is written as per-token weights computed once over
  the whole batch, so the gradient does not depend on how the batch is split into micro-batches.
- With mu = 1 (one pass per rollout batch, the paper's setting) the old log-probs are the current
  ones detached: the ratio is exactly 1 and the update is the REINFORCE gradient with a group baseline.
- The policy is anything with forward(ids) -> hidden states and logits(hidden) (model.Transformer,
  or a test's mock); forward_grouped() is used when it has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from model import Generation, SamplingConfig, generate, right_pad

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class GRPOConfig:
    """Everything the update step needs. Each field is named as train.py's flag (`--clip-low` is
    clip_low); the defaults are the paper's where it gives one and verl's where it does not."""

    adv_scale: str = "group"  # advantage std: "group" (GRPO) | "batch" | "none" (Dr. GRPO)
    adv_eps: float = 1e-6
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]; DAPO: clip_high 0.28
    clip_high: float = 0.2
    beta: float = 0.0  # KL coefficient; 0 in the paper, so no reference model
    kl_estimator: str = "k3"
    loss_agg: str = "token-mean"
    max_new_tokens: int = 1024  # the completion cap: Dr. GRPO's constant normaliser
    mu: int = 1  # passes (optimizer steps) over each rollout batch
    micro_batch: int | None = None  # rows per forward/backward; None = the whole batch
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # must equal the sampler's temperature
    drop_truncated: bool = False  # leave completions that hit max_new_tokens out of the loss
    logprob_chunk: int = 1024  # completion positions per output-head call
    share_prompt: bool = True  # one forward pass per prompt for its G rows (needs policy.forward_grouped)


@dataclass
class RolloutBatch:
    """One optimizer batch of sampled completions, N rows, L = longest prompt + completion.

    input_ids: (N, L) prompt then completion, right-padded (the pad value is irrelevant: masks come
    from lengths). sampler_logprobs: (N, L) the log-probs the sampler drew each completion token
    with, aligned with input_ids (0 elsewhere), or None. They are only compared with the policy's
    own scores (metric sampler_logp_absdiff); pi_old in the ratio is always scored by the policy.
    """

    input_ids: torch.Tensor  # (N, L) long
    prompt_lengths: torch.Tensor  # (N,) long
    completion_lengths: torch.Tensor  # (N,) long, including the stop token if any
    truncated: torch.Tensor  # (N,) bool
    prompt_index: torch.Tensor  # (N,) long, the group of each row
    rewards: torch.Tensor  # (N,) float
    sampler_logprobs: torch.Tensor | None = None


# -----------------------------------------------------------------------------
# Steps 1-2: sample a group of completions per prompt and score each one


def rollout(policy, prompts: list[list[int]], reward_fn: Callable[[int, list[int]], float],
            sampling: SamplingConfig, samples: int, generator: torch.Generator | None = None,
            pad_id: int = 0) -> RolloutBatch:
    """Sample `samples` (G) completions of each prompt and score each with the task's reward.

    reward_fn(prompt_index, completion_ids) -> float is called once per row, in row order (prompt-
    major: the G rows of prompt 0 first). Returns the RolloutBatch that grpo_update trains on.
    """
    gen = generate(policy, prompts, sampling, num_samples=samples, generator=generator, pad_id=pad_id)  # Step 1
    rewards = [reward_fn(i, c) for i, c in zip(gen.prompt_index.tolist(), gen.completions())]  # Step 2
    return rollout_from_generation(prompts, gen, rewards, pad_id)


def rollout_from_generation(prompts: list[list[int]], gen: Generation, rewards, pad_id: int = 0) -> RolloutBatch:
    """Concatenate each prompt with its sampled completion(s) into a right-padded RolloutBatch.

    prompts: token lists; gen: a model.Generation (tokens (N, T), lengths (N,), logprobs (N, T),
    truncated (N,), prompt_index (N,)); rewards: (N,) tensor or list of floats.
    """
    device = gen.tokens.device
    pidx = gen.prompt_index.long()
    completions = gen.completions()
    input_ids, _ = right_pad([prompts[i] + c for i, c in zip(pidx.tolist(), completions)], pad_id, device)
    plens = torch.tensor([len(prompts[i]) for i in pidx.tolist()], dtype=torch.long, device=device)
    clens = gen.lengths.long()
    sampler = torch.zeros(input_ids.shape, dtype=torch.float32, device=device)
    for row, (p, c) in enumerate(zip(plens.tolist(), clens.tolist())):
        sampler[row, p : p + c] = gen.logprobs[row, :c].float()
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    return RolloutBatch(input_ids, plens, clens, gen.truncated.bool(), pidx, rewards, sampler)


# -----------------------------------------------------------------------------
# Step 3: group-relative advantages


@dataclass
class Advantages:
    """What group_advantages returns."""

    advantages: torch.Tensor  # (N,)
    frac_zero_std_groups: float  # groups with all-equal rewards (or a single sample): no signal


def group_advantages(rewards, prompt_index, adv_scale: str = "group", eps: float = 1e-6) -> Advantages:
    """A_i = (r_i - mean of its group) / (std + eps), groups given by prompt_index (N,) long.

    std is the unbiased (Bessel, n - 1) std of the group for adv_scale="group", of all N rewards for
    "batch" (Lite PPO); "none" only subtracts the group mean (Dr. GRPO). Groups whose
    rewards are all equal, and groups of one sample, get exactly 0.
    """
    r = rewards.double()  # (N,)  double so equal rewards cancel exactly and std is accurate
    _, g = torch.unique(prompt_index, return_inverse=True)  # (N,) group id 0..K-1, order-free
    K = int(g.max()) + 1
    count = torch.bincount(g, minlength=K).double()  # (K,)
    mean = r.new_zeros(K).index_add_(0, g, r) / count  # DeepSeekMath §4.1.2
    dev = r - mean[g]
    var = r.new_zeros(K).index_add_(0, g, dev**2) / (count - 1).clamp(min=1)  # Bessel: n - 1
    rmax = r.new_full((K,), -math.inf).scatter_reduce(0, g, r, "amax")
    rmin = r.new_full((K,), math.inf).scatter_reduce(0, g, r, "amin")
    no_signal = (rmax == rmin) | (count < 2)  # (K,)
    if adv_scale == "group":
        adv = dev / (var.sqrt()[g] + eps)  # GRPO: DeepSeekMath §4.1.2 outcome supervision
    elif adv_scale == "batch":
        adv = dev / (r.std() + eps) if len(r) > 1 else dev  # Lite PPO: group mean, batch std
    elif adv_scale == "none":
        adv = dev  # Dr. GRPO: no std division (it up-weights too easy / too hard groups)
    else:
        raise ValueError(f"unknown advantage scale {adv_scale!r}")
    adv = torch.where(no_signal[g], torch.zeros_like(adv), adv)
    return Advantages(adv.to(rewards.dtype), no_signal.double().mean().item())


# -----------------------------------------------------------------------------
# Step 4: the loss mask and the log-probs of the sampled tokens


def completion_mask(prompt_lengths, completion_lengths, seq_len: int, truncated=None) -> torch.Tensor:
    """(N, seq_len) bool, True on positions [P_i, P_i + C_i): the completion including its stop token.

    Built from positions, never from `id == pad` (pad is often eos, which must be trained on).
    If `truncated` (N,) bool is given, those rows are left out entirely (DAPO overlong filtering).
    """
    pos = torch.arange(seq_len, device=prompt_lengths.device)[None, :]  # (1, L)
    start = prompt_lengths[:, None]
    mask = (pos >= start) & (pos < start + completion_lengths[:, None])  # (N, L)
    if truncated is not None:
        mask &= ~truncated[:, None]
    return mask


def _chunk_logprobs(policy, hidden, targets, temperature):
    # hidden (M, C), targets (M,) -> logp (M,), entropy (M,). Only M rows of (M, V) logits live at once.
    # fp32: a log-softmax over a 151k vocabulary in bf16 is too coarse for ratios near 1
    logits = policy.logits(hidden).float() / temperature  # (M, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():  # entropy is only logged
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def _predicting_hidden(policy, input_ids, loss_mask, prompt_lengths=None, prompt_index=None):
    """The hidden states that predict each masked token, and those tokens: (M, C), (M,), row-major.

    With prompt_index, rows of one group are assumed to share their prompt and policy.forward_grouped
    runs each prompt once for its G completions (exact; G times less prompt work)."""
    if prompt_index is None:
        hidden = policy(input_ids)  # (B, T, C)
        sel = loss_mask[:, 1:]  # (B, T-1): hidden at t-1 predicts token t
        return hidden[:, :-1][sel], input_ids[:, 1:][sel]
    N, L = input_ids.shape
    groups, inv = torch.unique(prompt_index, return_inverse=True)  # inv (N,): group of each row
    rows = torch.arange(N, device=input_ids.device)
    first = torch.full((len(groups),), N, device=rows.device).scatter_reduce(0, inv, rows, "amin")
    plen = prompt_lengths[first]  # (P,)
    prompts = input_ids[first, : int(plen.max())]  # (P, Tp); past each length is ignored (masked)
    idx = prompt_lengths[:, None] + torch.arange(int((L - prompt_lengths).max()), device=rows.device)
    comp = input_ids.gather(1, idx.clamp(max=L - 1))  # (N, Tc) completion tokens, from each row's start
    h_last, h = policy.forward_grouped(prompts, plen, comp, inv)
    pred = torch.cat((h_last[inv][:, None], h[:, :-1]), 1)  # (N, Tc, C): pred[:, j] predicts comp[:, j]
    sel = loss_mask.gather(1, idx.clamp(max=L - 1)) & (idx < L)
    return pred[sel], comp[sel]


def token_logprobs(policy, input_ids, loss_mask, temperature: float = 1.0, chunk_size: int = 1024,
                   prompt_lengths=None, prompt_index=None):
    """Log-probs of the tokens in input_ids (B, T) at the masked positions, under softmax(logits / T).

    Returns (logp (B, T) fp32, 0 outside the mask; entropy (B, T) detached). The output head runs
    only on positions that predict a completion token, `chunk_size` of them at a time; with grad
    enabled each chunk is checkpointed, so its (chunk, V) logits are recomputed in backward
    instead of all being kept alive (with a 151k vocabulary, (B, T, V) logits would dominate memory).
    Give prompt_lengths (B,) and prompt_index (B,) to share each prompt's forward pass among the rows
    of its group.
    """
    assert temperature > 0, "score with the sampling temperature; greedy (T=0) is not trainable"
    assert not loss_mask[:, 0].any(), "position 0 has no preceding hidden state to predict it"
    h, targets = _predicting_hidden(policy, input_ids, loss_mask, prompt_lengths, prompt_index)
    logps, ents = [], []
    # at least one chunk, even an empty one (no position to score): backward then still runs through
    # the whole model and the head, whose gradients are zero but dense (FSDP ranks meet in every
    # backward, and a tied embedding's lookup alone would leave a sparse gradient)
    for i in range(0, max(h.shape[0], 1), chunk_size):
        args = (policy, h[i : i + chunk_size], targets[i : i + chunk_size], temperature)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    flat_lp, flat_ent = torch.cat(logps), torch.cat(ents)
    zeros = torch.zeros(loss_mask.shape, dtype=torch.float32, device=input_ids.device)
    return zeros.masked_scatter(loss_mask, flat_lp), zeros.masked_scatter(loss_mask, flat_ent.detach())


# -----------------------------------------------------------------------------
# Step 5: per-token losses: the clipped surrogate and the KL


def kl_estimate(logp, ref_logp, kind: str = "k3"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

    logp, ref_logp: (...) log-probs of the same sampled tokens. k1 and k3 are unbiased, k3 >= 0
    with low variance; k2 is biased but low-variance. No clamping (verl clamps k3 to [-10, 10]).
    """
    log_r = ref_logp - logp  # log(pi_ref / pi), r has expectation 1 under pi
    if kind == "k1":
        return -log_r  # Schulman 2020 k1
    if kind == "k2":
        return 0.5 * log_r**2  # Schulman 2020 k2
    if kind == "k3":
        # Schulman 2020 k3 = DeepSeekMath eq. 4: r - log r - 1. expm1 keeps the tiny
        # differences near r = 1 that exp(x) - 1 would round away.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}")


def clipped_surrogate(logp, old_logp, advantages, clip_low: float = 0.2, clip_high: float = 0.2):
    """Per-token PPO-clip loss (to minimise) with separate lower / upper clip ranges.

    logp, old_logp: (B, T); advantages: broadcastable, e.g. (B, 1). Returns (loss (B, T),
    ratio (B, T) detached, clipped_low (B, T) bool, clipped_high (B, T) bool), where the clipped
    tokens are those whose gradient is cut off.
    """
    ratio = torch.exp(logp - old_logp)  # DeepSeekMath eq. 3: pi_theta / pi_old
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)  # DAPO eq. 8 (clip-higher)
    loss = torch.maximum(unclipped, clipped)  # min of the objectives = max of the losses
    r = ratio.detach()
    clipped_low = (advantages < 0) & (r < 1 - clip_low)
    clipped_high = (advantages > 0) & (r > 1 + clip_high)
    return loss, r, clipped_low, clipped_high


# -----------------------------------------------------------------------------
# Step 6: aggregation: per-token losses -> one number, with weights over the whole batch


def aggregation_weights(mask, mode: str = "token-mean", max_new_tokens: int | None = None,
                        all_reduce=None):
    """(N, T) weights w with loss = sum(w * per_token_loss), computed over the whole optimizer batch.

    token-mean (DAPO): 1 / (tokens in the batch); seq-mean-token-mean (GRPO): 1 / (|o_i| * seqs);
    seq-mean-token-sum-norm (Dr. GRPO): 1 / (max_new_tokens * seqs). Rows with no loss
    tokens (e.g. dropped truncations) do not count as sequences. With data parallelism,
    `all_reduce` (a sum over ranks) makes the token and sequence counts global.
    """
    m = mask.float()
    lengths = m.sum(-1, keepdim=True)  # (N, 1)
    counts = torch.stack([m.sum(), (lengths > 0).sum().float()])  # tokens, sequences in this batch
    if all_reduce is not None:
        counts = all_reduce(counts)
    n_tokens, n_seqs = counts.clamp(min=1)
    if mode == "token-mean":
        return m / n_tokens  # DAPO eq. 8: 1 / sum_i |o_i|
    if mode == "seq-mean-token-mean":
        return m / lengths.clamp(min=1) / n_seqs  # DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t
    if mode == "seq-mean-token-sum-norm":
        assert max_new_tokens, "Dr. GRPO needs a constant normaliser"
        return m / (max_new_tokens * n_seqs)  # Dr. GRPO: 1/G sum_i 1/L_max sum_t
    raise ValueError(f"unknown loss aggregation {mode!r}; one of {LOSS_AGG_MODES}")


# -----------------------------------------------------------------------------
# Step 7: one update (gradients over micro-batches, clipping, AdamW), mu times


def _micro_batches(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _take_rows(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if x is None else x[rows]


def _group_args(policy, batch: RolloutBatch, rows: slice, cfg: GRPOConfig):
    # (prompt_lengths, prompt_index) of the micro-batch when its groups can share their prompt pass
    if cfg.share_prompt and hasattr(policy, "forward_grouped"):
        return batch.prompt_lengths[rows], batch.prompt_index[rows]
    return None, None


@torch.no_grad()
def _batch_logprobs(policy, batch: RolloutBatch, mask, cfg: GRPOConfig) -> torch.Tensor:
    """(N, L) log-probs of the whole batch under `policy`, micro-batch by micro-batch, without grad."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for rows in _micro_batches(len(mask), cfg.micro_batch):
        out[rows] = token_logprobs(policy, batch.input_ids[rows], mask[rows], cfg.temperature, cfg.logprob_chunk,
                                   *_group_args(policy, batch, rows, cfg))[0]
    if hasattr(policy, "reshard"):  # FSDP (plumbing/parallel.py) frees the root's weights in backward: none here
        policy.reshard()
    return out


def _micro_batch_step(policy, ids, mask, weights, adv, old, ref, sampler_logp, cfg, groups) -> dict[str, float]:
    """Steps 4-5 for one micro-batch, then its backward; returns sums, not yet averaged."""
    logp, entropy = token_logprobs(policy, ids, mask, cfg.temperature, cfg.logprob_chunk, *groups)  # Step 4 (b, L)
    old = logp.detach() if old is None else old  # mu = 1: pi_old is the policy itself, the ratio exactly 1
    pg, ratio, clip_low, clip_high = clipped_surrogate(logp, old, adv, cfg.clip_low, cfg.clip_high)  # Step 5
    pg_loss = (pg * weights).sum()  # Step 6: the weights carry the whole batch's normaliser
    loss, kl = pg_loss, torch.zeros(())
    if ref is not None:
        kl = (kl_estimate(logp, ref, cfg.kl_estimator) * weights).sum()
        loss = loss + cfg.beta * kl  # DeepSeekMath eq. 3: the KL enters the loss, not the reward
    loss.backward()  # gradients add up over micro-batches into the whole batch's gradient
    lp = logp.detach()
    stats = {"loss": loss, "pg_loss": pg_loss, "kl": kl,
             # the rest are token sums, divided by the batch's token count at the end
             "ppo_kl": (old - lp) * mask,  # k1 of pi_old from pi (verl's ppo_kl)
             "pg_clipfrac_low": clip_low & mask, "pg_clipfrac_high": clip_high & mask,
             "ratio_mean": ratio * mask, "entropy": entropy * mask}
    if sampler_logp is not None:  # were the tokens scored with the distribution they were drawn from?
        stats["sampler_logp_absdiff"] = (lp - sampler_logp).abs() * mask
    return {k: v.sum().item() for k, v in stats.items()}


def sum_gradients(params, all_reduce) -> None:
    """Data parallel: each rank holds the gradient of its part of one sum-normalised loss; add the
    parts (`all_reduce`: an in-place sum over ranks). FSDP's backward has already summed the
    gradients of sharded parameters (DTensors), so those are left alone."""
    for p in params:
        if isinstance(p, DTensor):
            continue
        if p.grad is None:  # a rank may not have touched every parameter; it must still join
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)


def scalar(t: torch.Tensor) -> float:
    """A one-element tensor's value; under FSDP the grad norm is a DTensor of per-shard parts, which
    full_tensor() combines."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


def all_finite(params, all_reduce=None) -> bool:
    """Whether every weight in `params` is finite, on every rank (FSDP: each rank checks its shards;
    `all_reduce` sums the verdicts). One device sync for all tensors, not one per tensor."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    bad = torch.stack([~torch.isfinite(p).all() for p in local]).sum().float()
    return scalar(all_reduce(bad) if all_reduce is not None else bad) == 0


def grpo_update(policy, optimizer, batch: RolloutBatch, cfg: GRPOConfig, ref_policy=None,
                all_reduce=None) -> dict[str, float]:
    """Steps 3-7 on one rollout batch: cfg.mu optimizer steps; returns averaged metrics (verl's names).

    Each pass zero-grads, accumulates gradients over micro-batches (weights fixed over the whole
    batch), clips the grad norm and steps. A pass with a non-finite loss or grad norm does not step:
    grads are zeroed, metrics carry skipped=1.0 and the remaining passes are abandoned. A step that
    leaves any weight non-finite is reported as weights_finite=0.0 (the caller must not keep them).
    sampler_logp_absdiff is reported only when the batch carries the sampler's log-probs.
    Data parallel: each rank passes its own groups and `all_reduce` (an in-place sum over ranks);
    normalisers are then global and gradients are summed before clipping, so N ranks take exactly
    the step one process would take on all the groups. With FSDP (the policy sharded by
    plumbing/parallel.py) the backward pass sums the gradients itself. Either way all_reduce also makes
    the logged losses global and the decision to skip a non-finite step the same on every rank.
    """
    assert cfg.beta == 0 or ref_policy is not None, "beta > 0 needs a reference policy"
    assert cfg.loss_agg in LOSS_AGG_MODES, cfg.loss_agg
    # Step 3: advantages, grouped by the explicit prompt index (never by row order or text)
    adv = group_advantages(batch.rewards, batch.prompt_index, cfg.adv_scale, cfg.adv_eps)
    A = adv.advantages.float()[:, None]  # (N, 1): one advantage for all tokens of a row
    # Step 4: which positions are trained on: each completion and its stop token, from lengths
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1],
                           batch.truncated if cfg.drop_truncated else None)
    # Step 6: the aggregation weights, over the whole optimizer batch before the first micro-batch
    # (normalising per micro-batch would make the gradient depend on how the batch is split)
    weights = aggregation_weights(mask, cfg.loss_agg, cfg.max_new_tokens, all_reduce)
    # pi_old must stay fixed across the mu passes. It is rescored by the policy itself (as verl does),
    # so sampler/trainer numerical differences never enter the ratio; they are only logged.
    old_all = _batch_logprobs(policy, batch, mask, cfg) if cfg.mu > 1 else None
    ref_all = _batch_logprobs(ref_policy, batch, mask, cfg) if cfg.beta > 0 else None
    params = [p for p in policy.parameters() if p.requires_grad]
    totals, passes, skipped = {}, 0, 0.0
    for _ in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        for rows in _micro_batches(len(mask), cfg.micro_batch):  # Steps 4-6, micro-batch by micro-batch
            sampler = batch.sampler_logprobs if passes == 0 else None
            stats = _micro_batch_step(policy, batch.input_ids[rows], mask[rows], weights[rows], A[rows],
                                      _take_rows(old_all, rows), _take_rows(ref_all, rows),
                                      _take_rows(sampler, rows), cfg, _group_args(policy, batch, rows, cfg))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
        # Step 7: one optimizer step on the accumulated gradient
        if all_reduce is not None:
            sum_gradients(params, all_reduce)
        grad_norm = scalar(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm
        passes += 1
        bad = float(not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)))
        if all_reduce is not None:  # one decision for all ranks, or their next collectives would not pair up
            bad = all_reduce(torch.tensor([bad], device=mask.device)).item()
        if bad:
            optimizer.zero_grad(set_to_none=True)  # never step on nan/inf: train.py relies on this
            skipped = 1.0
            break
        optimizer.step()
        # autocast keeps the low-precision copy of each weight it casts until its region ends (train.py's
        # spans the whole run): those copies are stale now
        torch.clear_autocast_cache()
    # judge the step by what it produced, too: a finite gradient times a huge lr can still overflow
    weights_finite = float(all_finite(params, all_reduce)) if passes and not skipped else 1.0
    n_tok = max(int(mask.sum()), 1)
    if all_reduce is not None:  # each rank summed its part of the globally normalised losses: add the parts
        parts = all_reduce(torch.tensor([totals[k] for k in ("loss", "pg_loss", "kl")], dtype=torch.float64,
                                        device=mask.device))
        totals.update(zip(("loss", "pg_loss", "kl"), parts.tolist()))
    metrics = {k: v / passes for k, v in totals.items()}  # loss, pg_loss, kl, grad_norm: mean per pass
    for k in ("ppo_kl", "pg_clipfrac_low", "pg_clipfrac_high", "ratio_mean", "entropy"):
        metrics[k] /= n_tok  # token means
    if "sampler_logp_absdiff" in totals:
        metrics["sampler_logp_absdiff"] = totals["sampler_logp_absdiff"] / n_tok  # first pass only
    metrics.update(
        skipped=skipped,
        weights_finite=weights_finite,
        frac_reward_zero_std=adv.frac_zero_std_groups,
        reward_mean=batch.rewards.float().mean().item(),
        response_length_mean=batch.completion_lengths.float().mean().item(),
        truncated_frac=batch.truncated.float().mean().item(),
    )
    return metrics
