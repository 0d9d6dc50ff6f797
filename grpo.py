"""GRPO: sample a group of completions per prompt, score them, and push up the better-than-average ones.

The algorithm (DeepSeekMath §4.1, as used by RecZero), with the step numbers of the README and of
train.py. Steps 1-2 (sample with model.generate, score with the task's reward) run in train.py;
this file turns their output into one update:
  1-2. rollout_batch(): the prompts and their sampled completions as one right-padded batch.
  3.   group_advantages(): compare each completion with the others of its group (no value model:
       the group mean is the baseline).
  4.   token_logprobs(): log-probabilities of the sampled tokens under the policy being trained.
  5.   clipped_surrogate() (+ kl_estimate()): the PPO-style per-token loss.
  6.   aggregation_weights(): how per-token losses are averaged into one number.
  7.   grpo_update(): gradients over micro-batches, clipping, AdamW; mu passes per rollout batch.

Choices and simplifications:
- beta = 0 with a real checkpoint, as in the RecZero paper: no KL term, so no reference model is
  built or run. With beta > 0 (the demo: 0.3) the KL of the policy from the reference is estimated
  per token: k1 and k3 are unbiased, k3 >= 0 with low variance, k2 biased but low-variance; no
  clamping (verl clamps k3 to [-10, 10]).
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
  With mu > 1, pi_old is rescored by the policy itself before the first pass (as verl does), so
  sampler/trainer numerical differences never enter the ratio; they are only logged
  (sampler_logp_absdiff).
- A pass with a non-finite loss or grad norm does not step: its gradients are zeroed, the metrics
  carry skipped=1.0 and the remaining passes are abandoned. A step that leaves a weight non-finite
  is reported as weights_finite=0.0: the caller must not keep those weights.
- Several processes: grpo_update asks `ranks` for everything that involves the other processes
  (sums over ranks, gradient shards, the verdict on finiteness). Alone (OneProcess, below)
  each of those calls returns its input; under torchrun plumbing/parallel.Distributed sums token
  counts, gradients and losses over the ranks, so N ranks take exactly the step one process would
  take on all their groups.
- The policy is anything with forward(ids) -> hidden states and logits(hidden) (model.Transformer,
  or a test's mock).

Two exact speed-ups, each written after the plain computation it replaces and tested equal to it:
token_logprobs() runs the output head only where a completion token is predicted, a chunk of
positions at a time and recomputed in backward (with a 151k vocabulary, (B, T, V) logits would
dominate memory), and, given each row's prompt, runs each prompt once for its G completions through
policy.forward_grouped (G times less prompt work); plain_token_logprobs() is the plain version.
At least one chunk runs, even an empty one (no position to score): backward then still runs through
the whole model and the head, whose gradients are zero but dense (FSDP ranks meet in every backward,
and the tied embedding's sparse lookup gradient alone could not be clipped).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from model import Generation, right_pad

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class GRPOConfig:
    """Everything the update step needs. Each field but adv_eps, logprob_chunk and share_prompt is
    train.py's flag of the same name (`--clip-low` is clip_low) with the same default (a test checks);
    the defaults are the paper's where it gives one and verl's where it does not."""

    adv_scale: str = "group"  # advantage std: "group" (GRPO) | "batch" | "none" (Dr. GRPO)
    adv_eps: float = 1e-6
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]; DAPO: clip_high 0.28
    clip_high: float = 0.2
    beta: float = 0.0  # KL coefficient; 0 in the paper, so no reference model
    kl_estimator: str = "k3"
    loss_agg: str = "token-mean"
    max_new_tokens: int = 1024  # the completion cap: Dr. GRPO's constant normaliser
    mu: int = 1  # passes (optimizer steps) over each rollout batch
    micro_batch: int = 8  # rows per forward/backward; gradients accumulate over the whole batch
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # must equal the sampler's temperature
    drop_truncated: bool = False  # leave completions that hit max_new_tokens out of the loss
    logprob_chunk: int = 1024  # completion positions per output-head call (token_logprobs)
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
# Steps 1-2: the sampled completions and their rewards, as one batch


def rollout_batch(prompts: list[list[int]], gen: Generation, rewards, pad_id: int = 0) -> RolloutBatch:
    """Each prompt followed by its sampled completion(s) (a model.Generation), right-padded to (N, L);
    rewards: (N,) floats, row r's reward."""
    device = gen.tokens.device
    prompt_index = gen.prompt_index.long()
    input_ids, _ = right_pad([prompts[i] + c for i, c in zip(prompt_index.tolist(), gen.completions())],
                             pad_id, device)
    plens = torch.tensor([len(prompts[i]) for i in prompt_index.tolist()], dtype=torch.long, device=device)
    clens = gen.lengths.long()
    sampler = torch.zeros(input_ids.shape, dtype=torch.float32, device=device)
    for row, (p, c) in enumerate(zip(plens.tolist(), clens.tolist())):
        sampler[row, p : p + c] = gen.logprobs[row, :c].float()
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    return RolloutBatch(input_ids, plens, clens, gen.truncated.bool(), prompt_index, rewards, sampler)


def groups_with_signal(rewards, prompt_index) -> list[int]:
    """DAPO's dynamic sampling keeps a group only when its rewards differ (Yu et al. 2025, eq. 11: 0 < #correct
    < G): rewards (N,), prompt_index (N,) -> the sorted prompt ids whose rewards are not all equal."""
    ids = torch.unique(prompt_index)
    return [int(p) for p in ids if rewards[prompt_index == p].unique().numel() > 1]


def select_groups(batch: RolloutBatch, prompts: list[int]) -> RolloutBatch:
    """The rows of the groups `prompts` (prompt ids), renumbered 0..len(prompts)-1 in that order."""
    new_id = {p: k for k, p in enumerate(prompts)}
    rows = torch.tensor([r for r, p in enumerate(batch.prompt_index.tolist()) if p in new_id], dtype=torch.long)
    index = torch.tensor([new_id[p] for p in batch.prompt_index[rows].tolist()], dtype=torch.long)
    sampler = None if batch.sampler_logprobs is None else batch.sampler_logprobs[rows]
    return RolloutBatch(batch.input_ids[rows], batch.prompt_lengths[rows], batch.completion_lengths[rows],
                        batch.truncated[rows], index.to(batch.prompt_index.device), batch.rewards[rows], sampler)


def concat_batches(a: RolloutBatch, b: RolloutBatch) -> RolloutBatch:
    """a's rows then b's, b's prompt ids after a's, right-padded to the longer width."""
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(t):  # right-pad (N, L) to (N, width); the value is irrelevant, masks come from lengths
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    offset = int(a.prompt_index.max()) + 1 if len(a.prompt_index) else 0
    sampler = None if a.sampler_logprobs is None or b.sampler_logprobs is None else \
        torch.cat((pad(a.sampler_logprobs), pad(b.sampler_logprobs)))
    return RolloutBatch(torch.cat((pad(a.input_ids), pad(b.input_ids))),
                        torch.cat((a.prompt_lengths, b.prompt_lengths)),
                        torch.cat((a.completion_lengths, b.completion_lengths)), torch.cat((a.truncated, b.truncated)),
                        torch.cat((a.prompt_index, b.prompt_index + offset)), torch.cat((a.rewards, b.rewards)), sampler)


# -----------------------------------------------------------------------------
# Step 3: group-relative advantages


@dataclass
class Advantages:
    """What group_advantages returns."""

    values: torch.Tensor  # (N,) one advantage per row
    frac_zero_std_groups: float  # groups with all-equal rewards (or a single sample): no signal


def group_advantages(rewards, prompt_index, adv_scale: str = "group", eps: float = 1e-6) -> Advantages:
    """A_i = (r_i - mean of its group) / (std + eps) for rewards (N,) grouped by prompt_index (N,).
    adv_scale: the std of the "group" (GRPO), of the "batch" (Lite PPO), or "none" (Dr. GRPO)."""
    r = rewards.double()  # (N,)  double so equal rewards cancel exactly and std is accurate
    _, g = torch.unique(prompt_index, return_inverse=True)  # (N,) group id 0..K-1, order-free
    K = int(g.max()) + 1
    count = torch.bincount(g, minlength=K).double()  # (K,)
    mean = r.new_zeros(K).index_add_(0, g, r) / count  # DeepSeekMath §4.1.2
    centered = r - mean[g]
    var = r.new_zeros(K).index_add_(0, g, centered**2) / (count - 1).clamp(min=1)  # Bessel: n - 1
    rmax = r.new_full((K,), -math.inf).scatter_reduce(0, g, r, "amax")
    rmin = r.new_full((K,), math.inf).scatter_reduce(0, g, r, "amin")
    no_signal = (rmax == rmin) | (count < 2)  # (K,)
    if adv_scale == "group":
        adv = centered / (var.sqrt()[g] + eps)  # GRPO: DeepSeekMath §4.1.2 outcome supervision
    elif adv_scale == "batch":
        adv = centered / (r.std() + eps) if len(r) > 1 else centered  # Lite PPO: group mean, batch std
    elif adv_scale == "none":
        adv = centered  # Dr. GRPO: no std division (it up-weights too easy / too hard groups)
    else:
        raise ValueError(f"unknown advantage scale {adv_scale!r}")
    adv = torch.where(no_signal[g], torch.zeros_like(adv), adv)
    return Advantages(adv.to(rewards.dtype), no_signal.double().mean().item())


# -----------------------------------------------------------------------------
# Step 4: the loss mask and the log-probs of the sampled tokens


def completion_mask(prompt_lengths, completion_lengths, seq_len: int, truncated=None) -> torch.Tensor:
    """(N, seq_len) bool, True on [P_i, P_i + C_i): the completion and its stop token (never `id == pad`:
    pad is often eos). Rows with `truncated` (N,) True are left out (DAPO's overlong filtering)."""
    pos = torch.arange(seq_len, device=prompt_lengths.device)[None, :]  # (1, L)
    start = prompt_lengths[:, None]
    mask = (pos >= start) & (pos < start + completion_lengths[:, None])  # (N, L)
    if truncated is not None:
        mask &= ~truncated[:, None]
    return mask


def plain_token_logprobs(policy, input_ids, loss_mask, temperature: float = 1.0):
    """Log-probs of the tokens in input_ids (B, T) at the masked positions under softmax(logits / T):
    (logp (B, T) fp32, 0 outside the mask; entropy (B, T) detached). The whole (B, T, V) logits at once."""
    logits = policy.logits(policy(input_ids)[:, :-1]).float() / temperature  # position t-1 predicts token t
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
    logp = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
    first = logp.new_zeros(len(input_ids), 1)  # token 0 has nothing before it to predict it
    return (torch.cat((first, logp), 1) * loss_mask, torch.cat((first, entropy), 1) * loss_mask)


def _chunk_logprobs(policy, hidden, targets, temperature):
    # hidden (M, C), targets (M,) -> logp (M,), entropy (M,); fp32: bf16 is too coarse for ratios near 1
    logits = policy.logits(hidden).float() / temperature  # (M, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():  # entropy is only logged
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def _shared_prompt_hidden(policy, input_ids, loss_mask, prompt_lengths, prompt_index):
    """Speed-up of policy(input_ids), exact: the hidden states (M, C) that predict each masked token, and
    those tokens (M,), row-major, with one forward_grouped pass per prompt for its group's rows."""
    N, L = input_ids.shape
    prompt_ids, inv = torch.unique(prompt_index, return_inverse=True)  # inv (N,): group of each row
    rows = torch.arange(N, device=input_ids.device)
    first = torch.full((len(prompt_ids),), N, device=rows.device).scatter_reduce(0, inv, rows, "amin")
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
    """Speed-up of plain_token_logprobs, exact (see the module docstring): (logp, entropy), each (B, T).
    Give prompt_lengths (B,) and prompt_index (B,) to run each prompt once for its group."""
    assert temperature > 0, "score with the sampling temperature; greedy (T=0) is not trainable"
    assert not loss_mask[:, 0].any(), "position 0 has no preceding hidden state to predict it"
    if prompt_index is None:
        sel = loss_mask[:, 1:]  # (B, T-1): the hidden state at t-1 predicts token t
        h, targets = policy(input_ids)[:, :-1][sel], input_ids[:, 1:][sel]  # (M, C), (M,)
    else:
        h, targets = _shared_prompt_hidden(policy, input_ids, loss_mask, prompt_lengths, prompt_index)
    logps, ents = [], []
    for i in range(0, max(h.shape[0], 1), chunk_size):  # at least one chunk, even empty (module docstring)
        args = (policy, h[i : i + chunk_size], targets[i : i + chunk_size], temperature)
        lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled() \
            else _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    zeros = torch.zeros(loss_mask.shape, dtype=torch.float32, device=input_ids.device)
    return zeros.masked_scatter(loss_mask, torch.cat(logps)), zeros.masked_scatter(loss_mask, torch.cat(ents).detach())


# -----------------------------------------------------------------------------
# Step 5: per-token losses: the clipped surrogate and the KL


def kl_estimate(logp, ref_logp, kind: str = "k3"):
    """Per-token KL(pi || pi_ref) estimate (Schulman 2020) from log-probs (...) of tokens sampled from pi."""
    log_r = ref_logp - logp  # log(pi_ref / pi), r has expectation 1 under pi
    if kind == "k1":
        return -log_r  # Schulman 2020 k1
    if kind == "k2":
        return 0.5 * log_r**2  # Schulman 2020 k2
    if kind == "k3":  # expm1 keeps the tiny differences near r = 1 that exp(x) - 1 would round away
        return torch.expm1(log_r) - log_r  # Schulman 2020 k3 = DeepSeekMath eq. 4: r - log r - 1
    raise ValueError(f"unknown KL estimator {kind!r}")


def clipped_surrogate(logp, old_logp, advantages, clip_low: float = 0.2, clip_high: float = 0.2):
    """Per-token PPO-clip loss to minimise; logp, old_logp (B, T), advantages e.g. (B, 1). Returns
    (loss, ratio detached, clipped_low, clipped_high), each (B, T); clipped: the gradient is cut."""
    ratio = torch.exp(logp - old_logp)  # DeepSeekMath eq. 3: pi_theta / pi_old
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)  # DAPO eq. 8 (clip-higher)
    loss = torch.maximum(unclipped, clipped)  # min of the objectives = max of the losses
    r = ratio.detach()
    return loss, r, (advantages < 0) & (r < 1 - clip_low), (advantages > 0) & (r > 1 + clip_high)


# -----------------------------------------------------------------------------
# The other processes, when there are none (steps 6 and 7 ask them for sums)


@dataclass
class OneProcess:
    """What the update asks of the other ranks, answered for a run of one process: every sum is its
    input, there is no shard to gather or free. plumbing/parallel.Distributed answers the same calls
    under torchrun (sums over ranks, FSDP shards); each answer here is one line, so they are written
    as a table."""

    device: str = "cpu"
    rank: int = 0
    world: int = 1
    fsdp: bool = False

    def all_reduce(self, t): return t  # a tensor summed over ranks, in place
    def sum(self, x): return x  # a number summed over ranks
    def all_agree(self, ok): return ok  # whether `ok` holds on every rank
    def sum_gradients(self, params): pass  # data parallel: add the other ranks' parts
    def scalar(self, t): return t.item()  # a one-element tensor's value (FSDP: of all shards)
    def free(self, model): pass  # FSDP: release what a pass without backward gathered
    def gathered(self, model): return contextlib.nullcontext(model)  # FSDP: the whole model
    def barrier(self): pass
    def gather_objects(self, part): return part  # every rank's list, in rank order

    def all_finite(self, params) -> bool:  # every weight finite, on every rank (one device sync)
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


# -----------------------------------------------------------------------------
# Step 6: aggregation: per-token losses -> one number, with weights over the whole batch


def aggregation_weights(mask, mode: str = "token-mean", max_new_tokens: int | None = None,
                        ranks=OneProcess()):
    """(N, T) weights w, loss = sum(w * per-token loss), over the whole batch (all ranks' counts)."""
    m = mask.float()
    lengths = m.sum(-1, keepdim=True)  # (N, 1)
    counts = ranks.all_reduce(torch.stack([m.sum(), (lengths > 0).sum().float()]))  # tokens, sequences
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


def _logprobs(policy, batch: RolloutBatch, rows: slice, mask, cfg: GRPOConfig):
    """Step 4 on the batch's rows `rows`: token_logprobs, each prompt's pass shared by its group."""
    share = cfg.share_prompt and hasattr(policy, "forward_grouped")  # a test's mock policy has none
    prompts = (batch.prompt_lengths[rows], batch.prompt_index[rows]) if share else ()
    return token_logprobs(policy, batch.input_ids[rows], mask[rows], cfg.temperature, cfg.logprob_chunk, *prompts)


@torch.no_grad()
def _scored(policy, batch: RolloutBatch, mask, cfg: GRPOConfig, ranks) -> torch.Tensor:
    """(N, L) log-probs of the batch under `policy` (pi_old or the reference), micro-batch by micro-batch."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i in range(0, len(mask), cfg.micro_batch):
        out[i : i + cfg.micro_batch] = _logprobs(policy, batch, slice(i, i + cfg.micro_batch), mask, cfg)[0]
    ranks.free(policy)  # FSDP: a pass without backward must release the weights it gathered
    return out


def optimizer_step(optimizer, params, loss: float, max_grad_norm: float, ranks=OneProcess()) -> tuple[float, bool]:
    """Clip the accumulated gradient of `params` to max_grad_norm and step; when the loss or the norm is
    not finite (on any rank) zero the gradient instead. Returns (norm before clipping, stepped)."""
    ranks.sum_gradients(params)  # data parallel: add the other ranks' parts of the gradient
    grad_norm = ranks.scalar(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not ranks.all_agree(math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, False
    optimizer.step()
    # autocast keeps the low-precision copy of each weight it casts until its region ends (train.py's
    # spans the whole run): those copies are stale now
    torch.clear_autocast_cache()
    return grad_norm, True


def grpo_update(policy, optimizer, batch: RolloutBatch, cfg: GRPOConfig, ref_policy=None,
                ranks=OneProcess()) -> dict[str, float]:
    """Steps 3-7 on one rollout batch: cfg.mu optimizer steps; returns averaged metrics (verl's names).
    ranks: the other processes (OneProcess when alone; parallel.Distributed under torchrun)."""
    assert cfg.beta == 0 or ref_policy is not None, "beta > 0 needs a reference policy"
    assert cfg.loss_agg in LOSS_AGG_MODES, cfg.loss_agg
    # Step 3: advantages, grouped by the explicit prompt index (never by row order or text)
    advantages = group_advantages(batch.rewards, batch.prompt_index, cfg.adv_scale, cfg.adv_eps)
    row_adv = advantages.values.float()[:, None]  # (N, 1): a row's advantage applies to each of its tokens
    # Step 4: which positions are trained on: each completion and its stop token, from lengths
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1],
                           batch.truncated if cfg.drop_truncated else None)
    # Step 6: the weights, over the whole batch before the first micro-batch (normalising per
    # micro-batch would make the gradient depend on how the batch is split)
    weights = aggregation_weights(mask, cfg.loss_agg, cfg.max_new_tokens, ranks)
    old_logp = _scored(policy, batch, mask, cfg, ranks) if cfg.mu > 1 else None  # pi_old, fixed over the passes
    ref_logp = _scored(ref_policy, batch, mask, cfg, ranks) if cfg.beta > 0 else None
    params = [p for p in policy.parameters() if p.requires_grad]
    sums, passes, skipped = {}, 0, 0.0
    for _ in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, len(mask), cfg.micro_batch):  # Steps 4-6, micro-batch by micro-batch
            rows = slice(i, i + cfg.micro_batch)
            logp, entropy = _logprobs(policy, batch, rows, mask, cfg)  # Step 4: (b, L)
            # mu = 1: pi_old is the policy itself, so the ratio is exactly 1
            old = logp.detach() if old_logp is None else old_logp[rows]
            pg, ratio, clip_low, clip_high = clipped_surrogate(logp, old, row_adv[rows], cfg.clip_low,
                                                               cfg.clip_high)  # Step 5
            pg_loss = (pg * weights[rows]).sum()  # Step 6: the weights carry the whole batch's normaliser
            loss, kl = pg_loss, torch.zeros(())
            if ref_logp is not None:
                kl = (kl_estimate(logp, ref_logp[rows], cfg.kl_estimator) * weights[rows]).sum()
                loss = loss + cfg.beta * kl  # DeepSeekMath eq. 3: the KL enters the loss, not the reward
            loss.backward()  # gradients add up over micro-batches into the whole batch's gradient
            m, lp = mask[rows], logp.detach()
            for k, v in {"loss": loss, "pg_loss": pg_loss, "kl": kl, "ppo_kl": (old - lp) * m,  # verl's ppo_kl
                         "pg_clipfrac_low": clip_low & m, "pg_clipfrac_high": clip_high & m,
                         "ratio_mean": ratio * m, "entropy": entropy * m}.items():
                sums[k] = sums.get(k, 0.0) + v.sum().item()  # token sums: divided by the token count below
            if passes == 0 and batch.sampler_logprobs is not None:  # the sampler's log-probs, compared once
                diff = (lp - batch.sampler_logprobs[rows]).abs() * m
                sums["sampler_logp_absdiff"] = sums.get("sampler_logp_absdiff", 0.0) + diff.sum().item()
        # Step 7: clip the whole batch's gradient and take one AdamW step (never on nan/inf)
        grad_norm, stepped = optimizer_step(optimizer, params, sums["loss"], cfg.max_grad_norm, ranks)
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        passes += 1
        if not stepped:
            skipped = 1.0
            break
    return _step_metrics(sums, passes, skipped, advantages, batch, mask, params, ranks)


def _step_metrics(sums, passes, skipped, advantages, batch, mask, params, ranks) -> dict[str, float]:
    """The step's metrics: losses and grad norm per pass, token statistics per token, over all ranks."""
    n_tok = max(int(mask.sum()), 1)
    losses = ranks.all_reduce(torch.tensor([sums[k] for k in ("loss", "pg_loss", "kl")], dtype=torch.float64,
                                           device=mask.device))  # each rank summed its part
    sums.update(zip(("loss", "pg_loss", "kl"), losses.tolist()))
    metrics = {k: v / passes for k, v in sums.items()}  # loss, pg_loss, kl, grad_norm: mean per pass
    for k in ("ppo_kl", "pg_clipfrac_low", "pg_clipfrac_high", "ratio_mean", "entropy"):
        metrics[k] /= n_tok  # token means
    if "sampler_logp_absdiff" in sums:
        metrics["sampler_logp_absdiff"] = sums["sampler_logp_absdiff"] / n_tok  # first pass only
    # a finite gradient times a large learning rate can still overflow the weights
    weights_finite = float(ranks.all_finite(params)) if passes and not skipped else 1.0
    metrics.update(skipped=skipped, weights_finite=weights_finite, frac_reward_zero_std=advantages.frac_zero_std_groups,
                   reward_mean=batch.rewards.float().mean().item(),
                   response_length_mean=batch.completion_lengths.float().mean().item(),
                   truncated_frac=batch.truncated.float().mean().item())
    return metrics
