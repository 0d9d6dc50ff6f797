"""GRPO: group-relative advantages, the clipped surrogate, KL estimators and one update step.

The algorithm (DeepSeekMath §4.1, as used by RecZero): sample G completions per prompt, score each
with a rule-based reward, turn rewards into advantages by comparing each completion with the others
of its group, and push up the log-probability of every token of the better-than-average ones through
a PPO-style clipped ratio. There is no value model; the group mean is the baseline.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class GRPOConfig:
    """Everything the update step needs; defaults follow the paper / verl (see PAPER.md §4)."""

    scale: str = "group"  # advantage scale: "group" | "batch" | "none"
    adv_eps: float = 1e-6
    eps_low: float = 0.2  # ratio clipped to [1 - eps_low, 1 + eps_high]; DAPO uses eps_high 0.28
    eps_high: float = 0.2
    beta: float = 0.0  # KL coefficient; 0 in the paper, so no reference model
    kl_estimator: str = "k3"
    loss_agg: str = "token-mean"
    max_completion_length: int = 1024  # the Dr. GRPO constant normaliser
    mu: int = 1  # passes (optimizer steps) over each rollout batch
    micro_batch_size: int | None = None  # rows per forward/backward; None = the whole batch
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # must equal the sampler's temperature
    drop_truncated: bool = False  # leave completions that hit max_new_tokens out of the loss
    logprob_chunk: int = 1024  # completion positions per output-head call
    share_prompt: bool = True  # one forward pass per prompt for its G rows (needs policy.forward_grouped)


@dataclass
class RolloutBatch:
    """One optimizer batch of sampled completions, N rows, L = longest prompt + completion.

    input_ids: (N, L) prompt then completion, right-padded (pad value is irrelevant: masks come
    from lengths). old_logprobs: (N, L) the sampler's log-probs aligned with input_ids (0 outside
    completions), or None; only compared with the scorer's (metric sampler_logp_absdiff).
    """

    input_ids: torch.Tensor  # (N, L) long
    prompt_lengths: torch.Tensor  # (N,) long
    completion_lengths: torch.Tensor  # (N,) long, including the stop token if any
    truncated: torch.Tensor  # (N,) bool
    prompt_index: torch.Tensor  # (N,) long, the group of each row
    rewards: torch.Tensor  # (N,) float
    old_logprobs: torch.Tensor | None = None


def rollout_from_generation(prompts, gen, rewards, pad_id: int = 0) -> RolloutBatch:
    """Concatenate each prompt with its sampled completion(s) into a right-padded RolloutBatch.

    prompts: list of token lists; gen: a model.Generation (tokens (N, T), lengths (N,),
    logprobs (N, T), truncated (N,), prompt_index (N,)); rewards: (N,) or list of floats.
    """
    device = gen.tokens.device
    pidx = gen.prompt_index.long()
    plens = torch.tensor([len(prompts[i]) for i in pidx.tolist()], dtype=torch.long, device=device)
    clens = gen.lengths.long()
    N, L = len(pidx), int((plens + clens).max())
    input_ids = torch.full((N, L), pad_id, dtype=torch.long, device=device)
    old = torch.zeros(N, L, dtype=torch.float32, device=device)
    for row, (i, p, c) in enumerate(zip(pidx.tolist(), plens.tolist(), clens.tolist())):
        input_ids[row, :p] = torch.tensor(prompts[i], dtype=torch.long, device=device)
        input_ids[row, p : p + c] = gen.tokens[row, :c]
        old[row, p : p + c] = gen.logprobs[row, :c].float()
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    return RolloutBatch(input_ids, plens, clens, gen.truncated.bool(), pidx, rewards, old)


# -----------------------------------------------------------------------------
# Stage 1: group-relative advantages


@dataclass
class Advantages:
    """What group_advantages returns."""

    advantages: torch.Tensor  # (N,)
    frac_zero_std_groups: float  # groups with all-equal rewards (or a single sample): no signal


def group_advantages(rewards, prompt_index, scale: str = "group", eps: float = 1e-6) -> Advantages:
    """A_i = (r_i - mean of its group) / (std + eps), groups given by prompt_index (N,) long.

    std is the unbiased (Bessel, n - 1) std of the group for scale="group", of all N rewards for
    scale="batch" (Lite PPO); scale="none" only subtracts the group mean (Dr. GRPO). Groups whose
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
    if scale == "group":
        adv = dev / (var.sqrt()[g] + eps)  # GRPO: DeepSeekMath §4.1.2 outcome supervision
    elif scale == "batch":
        adv = dev / (r.std() + eps) if len(r) > 1 else dev  # Lite PPO: group mean, batch std
    elif scale == "none":
        adv = dev  # Dr. GRPO: no std division (it up-weights too easy / too hard groups)
    else:
        raise ValueError(f"unknown advantage scale {scale!r}")
    adv = torch.where(no_signal[g], torch.zeros_like(adv), adv)
    return Advantages(adv.to(rewards.dtype), no_signal.double().mean().item())


# -----------------------------------------------------------------------------
# Stage 2: loss mask and token log-probs


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
    instead of all being kept alive (pitfall 8). Give prompt_lengths (B,) and prompt_index (B,)
    to share each prompt's forward pass among the rows of its group.
    """
    assert temperature > 0, "score with the sampling temperature; greedy (T=0) is not trainable"
    assert not loss_mask[:, 0].any(), "position 0 has no preceding hidden state to predict it"
    h, targets = _predicting_hidden(policy, input_ids, loss_mask, prompt_lengths, prompt_index)
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk_size):
        args = (policy, h[i : i + chunk_size], targets[i : i + chunk_size], temperature)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    flat_lp = torch.cat(logps) if logps else h.new_zeros(0, dtype=torch.float32)
    flat_ent = torch.cat(ents) if ents else flat_lp.detach()
    zeros = torch.zeros(loss_mask.shape, dtype=torch.float32, device=input_ids.device)
    return zeros.masked_scatter(loss_mask, flat_lp), zeros.masked_scatter(loss_mask, flat_ent.detach())


# -----------------------------------------------------------------------------
# Stage 3: per-token losses: clipped surrogate and KL


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
        # differences near r = 1 that exp(x) - 1 would round away (pitfall 9).
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}")


def clipped_surrogate(logp, old_logp, advantages, eps_low: float = 0.2, eps_high: float = 0.2):
    """Per-token PPO-clip loss (to minimise) with separate lower / upper clip ranges.

    logp, old_logp: (B, T); advantages: broadcastable, e.g. (B, 1). Returns (loss (B, T),
    ratio (B, T) detached, clipped_low (B, T) bool, clipped_high (B, T) bool), where the clipped
    tokens are those whose gradient is cut off.
    """
    ratio = torch.exp(logp - old_logp)  # DeepSeekMath eq. 3: pi_theta / pi_old
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # DAPO eq. 8 (clip-higher)
    loss = torch.maximum(unclipped, clipped)  # min of the objectives = max of the losses
    r = ratio.detach()
    clipped_low = (advantages < 0) & (r < 1 - eps_low)
    clipped_high = (advantages > 0) & (r > 1 + eps_high)
    return loss, r, clipped_low, clipped_high


def aggregation_weights(mask, mode: str = "token-mean", max_completion_length: int | None = None,
                        all_reduce=None):
    """(N, T) weights w with loss = sum(w * per_token_loss), computed over the whole optimizer batch.

    token-mean (DAPO): 1 / (tokens in the batch); seq-mean-token-mean (GRPO): 1 / (|o_i| * seqs);
    seq-mean-token-sum-norm (Dr. GRPO): 1 / (max_completion_length * seqs). Rows with no loss
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
        assert max_completion_length, "Dr. GRPO needs a constant normaliser"
        return m / (max_completion_length * n_seqs)  # Dr. GRPO: 1/G sum_i 1/L_max sum_t
    raise ValueError(f"unknown loss aggregation {mode!r}; one of {LOSS_AGG_MODES}")


# -----------------------------------------------------------------------------
# Stage 4: one update step


def _micro_batches(n: int, size: int | None):
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _rows(x, mb):
    return None if x is None else x[mb]


@torch.no_grad()
def _batch_logprobs(policy, batch, mask, cfg):
    # (N, L) log-probs of a whole batch, micro-batch by micro-batch, without grad.
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for mb in _micro_batches(len(mask), cfg.micro_batch_size):
        out[mb] = token_logprobs(policy, batch.input_ids[mb], mask[mb], cfg.temperature, cfg.logprob_chunk,
                                 *_group_args(policy, batch, mb, cfg))[0]
    return out


def _group_args(policy, batch, mb, cfg):
    # (prompt_lengths, prompt_index) of the micro-batch when its groups can share their prompt pass
    if cfg.share_prompt and hasattr(policy, "forward_grouped"):
        return batch.prompt_lengths[mb], batch.prompt_index[mb]
    return None, None


def _micro_batch_step(policy, ids, mask, weights, adv, old, ref, sampler_logp, cfg, groups) -> dict[str, float]:
    """Forward, per-token losses and backward for one micro-batch; returns sums, not yet averaged."""
    # Stage 3: per-token losses
    logp, entropy = token_logprobs(policy, ids, mask, cfg.temperature, cfg.logprob_chunk, *groups)  # (b, L)
    old = logp.detach() if old is None else old  # mu = 1: ratio exactly 1
    pg, ratio, clip_low, clip_high = clipped_surrogate(logp, old, adv, cfg.eps_low, cfg.eps_high)
    pg_loss = (pg * weights).sum()
    loss, kl = pg_loss, torch.zeros(())
    if ref is not None:
        kl = (kl_estimate(logp, ref, cfg.kl_estimator) * weights).sum()
        loss = loss + cfg.beta * kl  # DeepSeekMath eq. 3: the KL enters the loss, not the reward
    loss.backward()  # the weights already carry the whole-batch normaliser: no division here
    lp = logp.detach()
    stats = {"loss": loss, "pg_loss": pg_loss, "kl": kl,
             # the rest are token sums, divided by the batch's token count at the end
             "ppo_kl": (old - lp) * mask,  # k1 of pi_old from pi (verl's ppo_kl)
             "pg_clipfrac_low": clip_low & mask, "pg_clipfrac_high": clip_high & mask,
             "ratio_mean": ratio * mask, "entropy": entropy * mask}
    if sampler_logp is not None:  # pitfall 2: sampled and scored with one distribution?
        stats["sampler_logp_absdiff"] = (lp - sampler_logp).abs() * mask
    return {k: v.sum().item() for k, v in stats.items()}


def grpo_update(policy, optimizer, batch: RolloutBatch, cfg: GRPOConfig, ref_policy=None,
                all_reduce=None) -> dict[str, float]:
    """Run cfg.mu optimizer steps on one rollout batch; return averaged metrics (verl-style names).

    Each pass zero-grads, accumulates gradients over micro-batches (weights fixed over the whole
    batch), clips the grad norm and steps. A pass with a non-finite loss or grad norm does not step:
    grads are zeroed, metrics carry skipped=1.0 and the remaining passes are abandoned.
    sampler_logp_absdiff is reported only when the batch carries the sampler's log-probs.
    Data parallel: each rank passes its own groups and `all_reduce` (an in-place sum over ranks);
    normalisers are then global and gradients are summed before clipping, so N ranks take exactly
    the step one process would take on all the groups.
    """
    assert cfg.beta == 0 or ref_policy is not None, "beta > 0 needs a reference policy"
    assert cfg.loss_agg in LOSS_AGG_MODES, cfg.loss_agg
    # Stage 1: advantages from the explicit prompt index (pitfall 5)
    adv = group_advantages(batch.rewards, batch.prompt_index, cfg.scale, cfg.adv_eps)
    A = adv.advantages.float()[:, None]  # (N, 1): one advantage for all tokens of a row
    # Stage 2: mask and normalisers, over the whole optimizer batch (pitfalls 1 and 3)
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1],
                           batch.truncated if cfg.drop_truncated else None)
    weights = aggregation_weights(mask, cfg.loss_agg, cfg.max_completion_length, all_reduce)
    # pi_old must stay fixed across the mu passes. It is rescored by the policy itself (as verl does),
    # so sampler/trainer numerical differences never enter the ratio; they are only logged.
    old_all = _batch_logprobs(policy, batch, mask, cfg) if cfg.mu > 1 else None
    ref_all = _batch_logprobs(ref_policy, batch, mask, cfg) if cfg.beta > 0 else None
    params = [p for p in policy.parameters() if p.requires_grad]
    totals, passes, skipped = {}, 0, 0.0
    for _ in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        for mb in _micro_batches(len(mask), cfg.micro_batch_size):
            sampler = batch.old_logprobs if passes == 0 else None
            stats = _micro_batch_step(policy, batch.input_ids[mb], mask[mb], weights[mb], A[mb],
                                      _rows(old_all, mb), _rows(ref_all, mb), _rows(sampler, mb), cfg,
                                      _group_args(policy, batch, mb, cfg))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
        if all_reduce is not None:  # each rank holds part of one sum-normalised loss: add the parts
            for p in params:
                if p.grad is None:  # a rank may not have touched every parameter; it must still join
                    p.grad = torch.zeros_like(p)
                all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm
        passes += 1
        if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)  # never step on nan/inf: train.py relies on this
            skipped = 1.0
            break
        optimizer.step()
    n_tok = max(int(mask.sum()), 1)
    metrics = {k: v / passes for k, v in totals.items()}  # loss, pg_loss, kl, grad_norm: mean per pass
    for k in ("ppo_kl", "pg_clipfrac_low", "pg_clipfrac_high", "ratio_mean", "entropy"):
        metrics[k] /= n_tok  # token means
    if "sampler_logp_absdiff" in totals:
        metrics["sampler_logp_absdiff"] = totals["sampler_logp_absdiff"] / n_tok  # first pass only
    metrics.update(
        skipped=skipped,
        frac_reward_zero_std=adv.frac_zero_std_groups,
        reward_mean=batch.rewards.float().mean().item(),
        response_length_mean=batch.completion_lengths.float().mean().item(),
        truncated_frac=batch.truncated.float().mean().item(),
    )
    return metrics
