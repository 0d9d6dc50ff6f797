"""A memory plan: what a run will hold on its device, from config.json and the flags alone.

Exact from the parameter counts (a model built on the meta device): the weights, their gradients,
AdamW's two moments and the frozen reference model (--beta > 0), each in its dtype. Computed from
the shapes: the sampler's KV cache (every row of a step holds prompt + max_new_tokens positions).
Estimated: the activations autograd keeps for one backward pass, counted per token and layer as
4 hidden + 4 intermediate + 4 query + 2 key/value floats (what our Block saves: the inputs of its
linear layers, RoPE'd queries and keys, attention output, the MLP's gate, up and product), plus
2 hidden + 2 head_dim outside the blocks (measured within 3% with saved-tensor hooks on tiny models
and on SmolLM2-135M's shape, see tests/test_memory.py); with
--grad-checkpointing only each block's input is kept, plus one block's activations while it is
recomputed. The output head works on 1024 positions at a time (grpo.token_logprobs), so its largest
tensor is 1024 x vocab fp32.

With FSDP over N ranks (--fsdp) the weights, gradients, AdamW and the reference are 1/N each, plus
what is gathered whole at a time, in the compute dtype: the whole model while sampling, and during
the update two blocks, the root unit (embedding, final norm, head) and the root's fp32 gradient.
In one process, fp32 weights with bf16 compute also hold autocast's bf16 copy of the trained weights
(its cast cache lives until the optimizer step).

RecOne with a --teacher model holds that model (compute dtype) and its KV cache next to the weights
during the cold start; it is freed before training, so the peak is the largest of the phases.
Greedy evaluation holds the weights (and autocast's copies), the KV cache of its batch (up to 64
examples at a time) and, while it prefills their prompts, one layer's tensors at a time: what
--eval-only needs (`fits(plan, capacity, evaluation=True)`); a validation between GRPO steps holds
the same beside AdamW's moments. On a CPU the process's own memory (Python, torch, the data; measured
when the plan is made) shares the device's and is added to every phase.

Not counted: the allocator's fragmentation and workspace (often 5-15% on CUDA), CUDA context
(~0.5 GB), temporaries inside single operations, and on a CPU the memory the allocator keeps after
tensors are freed. The plan is a floor, not a promise: docs/running.md gives the measured peaks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import lora
from model import ModelConfig, Transformer

GiB = 1024**3
HEAD_CHUNK = 1024  # output-head positions at a time (grpo.token_logprobs' chunk_size)


@dataclass
class MemoryPlan:
    """Bytes a run holds at its peak (the update step), by kind."""

    parameters: int  # counts, not bytes
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    reference: int
    kv_cache: int
    activations: int
    largest_activation: int
    gathered_sampling: int = 0  # FSDP: the whole model, gathered for the rollout (parallel.gathered)
    gathered_update: int = 0  # FSDP: the units gathered at once in the update (two blocks and the root)
    teacher: int = 0  # RecOne's --teacher model and its KV cache, held with the weights during the cold start
    autocast_copies: int = 0  # bf16 copies autocast keeps of fp32 weights between optimizer steps
    eval_kv_cache: int = 0  # the KV cache of one batch of greedy evaluation (report.evaluate)
    host: int = 0  # what the process held before the model (Python, torch, the data): host_bytes() on a CPU
    eval_pass: int = 0  # the tensors one layer of the evaluation's prefill holds at once (no autograd)

    @property
    def total(self) -> int:
        # the sampler's cache is freed before the update, whose activations are the peak
        training = (self.weights + self.gradients + self.optimizer + self.reference + self.autocast_copies
                    + max(self.kv_cache + self.gathered_sampling,
                          self.activations + self.largest_activation + self.gathered_update))
        # the teacher is freed before training; a validation between steps holds AdamW but no gradients
        validating = self.weights + self.optimizer + self.reference + self.autocast_copies + self.eval_kv_cache \
            + self.eval_pass
        return self.host + max(training, self.weights + self.teacher, validating)

    @property
    def evaluation(self) -> int:
        """What scoring holds: the weights (and autocast's copies), one evaluation batch's KV cache and its
        prefill's working tensors."""
        return self.host + self.weights + self.autocast_copies + self.eval_kv_cache + self.eval_pass

    def describe(self) -> str:
        rows = [("this process before the model (CPU: Python, torch, data)", self.host)] if self.host else []
        rows += [("weights", self.weights), ("gradients", self.gradients), ("AdamW moments", self.optimizer),
                ("reference model (--beta > 0)", self.reference), ("KV cache while sampling", self.kv_cache),
                ("KV cache while evaluating (up to 64 examples at once)", self.eval_kv_cache),
                ("evaluation's prefill, one layer's tensors", self.eval_pass),
                ("activations of one micro-batch", self.activations),
                ("largest single activation (output-head chunk)", self.largest_activation)]
        if self.autocast_copies:
            rows += [("autocast's bf16 copies of the fp32 weights", self.autocast_copies)]
        if self.teacher:
            rows += [("--teacher model and its KV cache (cold start only)", self.teacher)]
        if self.gathered_sampling:
            rows += [("FSDP: whole weights gathered while sampling", self.gathered_sampling),
                     ("FSDP: units gathered during the update", self.gathered_update)]
        rows += [("peak (cache or activations, not both; or the teacher, or a validation)", self.total)]
        head = f"memory plan: {self.parameters / 1e6:,.1f}M parameters, {self.trainable / 1e6:,.1f}M trained"
        return "\n".join([head] + [f"  {name:<58} {_size(value):>10}" for name, value in rows])


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


def plan_memory(config: ModelConfig, *, weight_bytes: int, compute_bytes: int, lora_rank: int = 0,
                lora_targets=lora.TARGETS, beta: float = 0.0, rows: int, prompt_tokens: int, new_tokens: int,
                micro_batch: int, grad_checkpointing: bool = False, shards: int = 1,
                teacher: int = 0, eval_rows: int = 0, host: int = 0, cpu: bool = False) -> MemoryPlan:
    """The plan for one process. rows: completions sampled per step on this process (prompts x G);
    micro_batch: rows per forward/backward; prompt_tokens: the longest prompt expected.
    shards > 1 (FSDP over that many ranks): weights, gradients, AdamW and the reference are split
    evenly; sampling holds a whole copy of the weights in the compute dtype, the update two blocks,
    the root unit (embedding, final norm, head) and the root's gradient, gathered. teacher: the
    teacher_bytes() of a --teacher model this run's cold start loads, else 0. eval_rows: examples
    decoded at once by the greedy evaluation. host: bytes the process already holds besides the model
    (host_bytes() when the device is the CPU, whose RAM they share; 0 on a GPU). cpu: the run computes
    on a CPU, where a 16-bit run attends in fp32 (model.cpu_attention)."""
    with torch.device("meta"):
        model = Transformer(config)
        if lora_rank:
            lora.add_lora(model, lora_rank, 2.0 * lora_rank, lora_targets)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # LoRA: the frozen base in the compute dtype, fp32 adapters; otherwise every weight is trained
    train_bytes = 4 if lora_rank else weight_bytes
    base_bytes = compute_bytes if lora_rank else weight_bytes
    weights = (n_all - n_train) * base_bytes + n_train * train_bytes
    c = config
    kv_width = c.num_kv_heads * c.head_dim
    kv_cache = 2 * c.num_layers * kv_width * rows * (prompt_tokens + new_tokens) * compute_bytes
    eval_kv_cache = 2 * c.num_layers * kv_width * eval_rows * (prompt_tokens + new_tokens) * compute_bytes
    # a prefill without autograd holds one layer's tensors at a time: the residual stream and its norm,
    # q, k, v and the attention output, and the MLP's gate, up, activation and product
    # (the residual stream in the weights' dtype: fp32 under autocast, as in the activations below)
    stream_bytes = weight_bytes if not lora_rank else compute_bytes
    attention_bytes = 4 if cpu else compute_bytes  # model.cpu_attention
    eval_pass = eval_rows * prompt_tokens * (4 * c.hidden_size * stream_bytes + (
        2 * c.num_heads * c.head_dim + 2 * kv_width) * attention_bytes + 4 * c.intermediate_size * compute_bytes)
    tokens = micro_batch * (prompt_tokens + new_tokens)  # at most: a group's prompt is in fact run once
    per_layer = 4 * c.hidden_size + 4 * c.intermediate_size + 4 * c.num_heads * c.head_dim + 2 * kv_width
    outside = 2 * c.hidden_size + 2 * c.head_dim  # the embedding's output and final norm; RoPE's cos and sin
    if grad_checkpointing:
        floats = tokens * (c.hidden_size * c.num_layers + outside + per_layer)
        hidden, blocks = tokens * c.hidden_size * (c.num_layers + 4 + 2), 1  # block inputs, one block's, outside
    else:
        floats = tokens * (per_layer * c.num_layers + outside)
        hidden, blocks = tokens * c.hidden_size * (4 * c.num_layers + 2), c.num_layers
    activation_bytes = floats * compute_bytes
    if not lora_rank and weight_bytes > compute_bytes:
        # fp32 weights under bf16 autocast: the embedding's output, hence the residual stream and the norms
        # that read it, stay fp32, and the linear layers save bf16 casts of them besides (measured with
        # saved-tensor hooks, tests/test_memory.py; counting all in bf16 left a bf16 SFT of SmolLM2-135M
        # 8% over its plan)
        activation_bytes += hidden * (weight_bytes - compute_bytes) + tokens * 4 * c.hidden_size * blocks * compute_bytes
    if cpu:  # a 16-bit run attends in fp32 on a CPU (model.cpu_attention), which saves fp32 copies
        activation_bytes += tokens * blocks * (4 * c.num_heads * c.head_dim + 2 * kv_width) * (4 - compute_bytes)
    n_block = sum(p.numel() for p in model.layers[0].parameters())
    n_root = n_all - c.num_layers * n_block  # embedding, final norm, head: FSDP's root unit, in its own dtype
    n_root_trained = n_train - sum(p.numel() for p in model.layers.parameters() if p.requires_grad)
    return MemoryPlan(
        parameters=n_all, trainable=n_train, weights=_split(weights, shards),
        gradients=_split(n_train * train_bytes, shards), optimizer=_split(2 * n_train * train_bytes, shards),
        reference=_split(n_all * compute_bytes, shards) if beta > 0 else 0,
        kv_cache=kv_cache, eval_kv_cache=eval_kv_cache, eval_pass=eval_pass, activations=activation_bytes,
        largest_activation=min(HEAD_CHUNK, tokens) * c.vocab_size * 4,
        # FSDP gathers weights in the compute dtype
        gathered_sampling=n_all * compute_bytes if shards > 1 else 0,
        # two blocks (one running, one prefetched), the root, and the root's whole fp32 gradient before
        # its reduce-scatter (the root is gathered from forward to the end of backward)
        gathered_update=((2 * n_block + n_root) * compute_bytes + n_root_trained * 4) if shards > 1 else 0,
        # one process, fp32 weights under bf16 autocast: autocast keeps the bf16 copy of every weight it
        # casts until the step (train.py clears it after each optimizer step)
        autocast_copies=n_train * compute_bytes if shards == 1 and train_bytes > compute_bytes else 0,
        teacher=teacher, host=host)


def _split(n_bytes: int, shards: int) -> int:
    return -(-n_bytes // shards)  # FSDP pads each tensor to a multiple of the ranks: round up


def teacher_bytes(config: ModelConfig, compute_bytes: int, rows: int, tokens: int) -> int:
    """A --teacher model in the compute dtype, and its sampler's KV cache for `rows` prompts of up to
    `tokens` positions (teachers.ModelTeacher writes 16 traces at a time)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(config).parameters())
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * rows * tokens * compute_bytes
    return n * compute_bytes + kv


def host_bytes() -> int:
    """This process's resident memory now, in bytes (Linux: /proc/self/statm; 0 where it cannot be read)."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def device_bytes(device: str) -> int:
    """Memory of the device a run will use: the GPU's, or the machine's RAM for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(plan: MemoryPlan, capacity: int, evaluation: bool = False) -> str | None:
    """None when the plan fits `capacity` bytes, else a message saying which flags shrink it.
    evaluation: only scoring (--eval-only), which holds the weights and the evaluation's KV cache."""
    if evaluation:
        if plan.evaluation <= capacity:
            return None
        return (f"scoring needs about {plan.evaluation / GiB:.1f} GiB (weights and the KV cache of the evaluation "
                f"batch) and the device has {capacity / GiB:.1f} GiB: lower --max-new-tokens")
    if plan.total <= capacity:
        return None
    biggest = max([("weights", plan.weights), ("gradients", plan.gradients), ("AdamW moments", plan.optimizer),
                   ("the reference model", plan.reference), ("the KV cache", plan.kv_cache),
                   ("activations", plan.activations)], key=lambda kv: kv[1])[0]
    return (f"the run needs about {plan.total / GiB:.1f} GiB and the device has {capacity / GiB:.1f} GiB "
            f"(largest part: {biggest}). Smaller: --lora-rank 16 (weights frozen, only adapters trained), "
            "--grad-checkpointing (activations), --micro-batch, --max-new-tokens, --prompts-per-step or "
            "--samples (cache), --master-weights same (halves weights and AdamW), --beta 0 (no reference)")


def prompt_length(prompts, limit: int = 256) -> int:
    """The longest of the first `limit` prompts (lists of token ids): the plan's prompt length."""
    return max((len(p) for p in prompts[:limit]), default=0)

