"""Running as one of N processes (torchrun): data parallel, and FSDP for models that outgrow one GPU.

`Distributed` answers what the lesson asks of the other ranks (grpo.grpo_update's `ranks`: sums,
the verdict on finiteness, shards); a run of one process gets grpo.OneProcess instead, whose every
answer is trivial.

Data parallel (the default under torchrun): every rank holds the whole model, samples its share of a
step's prompts and adds its gradient to the others' (Distributed.sum_gradients).

FSDP (--fsdp): PyTorch's own fully_shard (FSDP2) splits every parameter, its gradient and AdamW's
moments into N row shards, one per rank, so each GPU holds 1/N of them. Each decoder block is one
unit: its full weights are gathered just before it runs and freed after; the backward pass sums the
gradient shards across ranks (a reduce-scatter). Weights are gathered in the compute dtype (bf16 on
GPUs, see shard()). Four places need more than that:

- Sampling and evaluation run one forward per generated token, and ranks stop at different lengths.
  A gathered model could not serve a rank that stops early (the others would wait for it in the next
  gather), so `gathered()` holds the whole model unsharded for the duration: no collective inside,
  the memory of one full copy of the weights for a while (what verl's vLLM rollout also holds).
- Every rank must run the same number of forward/backward passes through the sharded model, or a
  gather waits forever: GRPO gives each rank the same number of rows; the cold-start SFT pads a
  rank's short share with zero-weight micro-batches (train.sft), and a micro-batch without a single
  loss token still runs its backward (grpo.token_logprobs).
- A pass without backward (the KL reference, pi_old for mu > 1) must free the root unit itself,
  which otherwise stays gathered until a backward (grpo._scored calls Distributed.free).
- Checkpoints stay one plain Hugging Face folder: `full_state_dict` gathers each tensor in turn,
  rank 0 keeps it on the CPU and writes the folder; the others only take part in the gathers.
  Loading is the reverse: every rank reads the full file and keeps its own shard (`shard_like`).

Simplifications: one shard group across all ranks (no hybrid sharding across nodes); no CPU
offload; every rank reads whole checkpoints into host memory before keeping its shard; the embedding, final norm and output head form one more unit, gathered with the model's
forward and kept until its backward (the head runs outside forward(), in grpo.token_logprobs).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from grpo import OneProcess


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False  # the model is sharded (--fsdp): collectives inside forward/backward and saves
    device: str = "cpu"  # where collectives' tensors live (NCCL: the GPU)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over all ranks, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def sum(self, x: float) -> float:
        """x summed over all ranks."""
        return self.all_reduce(torch.tensor([x], dtype=torch.float64, device=self.device)).item()

    def all_agree(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank: one decision for all (to step or not), or their next
        collectives would not pair up."""
        return self.sum(float(not ok)) == 0

    def sum_gradients(self, params) -> None:
        """Data parallel: each rank holds the gradient of its part of one sum-normalised loss; add the
        parts. FSDP's backward has already summed the gradients of sharded parameters (DTensors)."""
        if self.world == 1:
            return
        for p in params:
            if isinstance(p, DTensor):
                continue
            if p.grad is None:  # a rank may not have touched every parameter; it must still join
                p.grad = torch.zeros_like(p)
            self.all_reduce(p.grad)

    def scalar(self, t: torch.Tensor) -> float:
        """A one-element tensor's value; under FSDP the grad norm is a DTensor of per-shard parts, which
        full_tensor() combines."""
        return (t.full_tensor() if isinstance(t, DTensor) else t).item()

    def all_finite(self, params) -> bool:
        """Whether every weight in `params` is finite, on every rank (FSDP: each rank checks its shards).
        One device sync for all tensors, not one per tensor."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        bad = torch.stack([~torch.isfinite(p).all() for p in local]).sum().float()
        return self.scalar(self.all_reduce(bad)) == 0

    def free(self, model) -> None:
        """FSDP frees the root unit's weights in backward: after a pass without one, free them here."""
        if is_sharded(model):
            model.reshard()

    def gathered(self, model):
        """`gathered(model)` below: the whole model for a block whose forwards differ between ranks."""
        return gathered(model)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, part: list) -> list:
        """Every rank's `part` (a picklable list), concatenated in rank order, on every rank."""
        if self.world == 1:
            return part
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, part)
        return [x for p in parts for x in p]


def setup_distributed(device: str, fsdp: bool = False):
    """torchrun sets WORLD_SIZE/RANK: NCCL on GPUs, gloo on CPUs; one process gets grpo.OneProcess."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 and not fsdp:
        return OneProcess(device=device)
    # 30 minutes (NCCL's default is 10): the other ranks wait in their next collective while rank 0
    # writes a checkpoint, and a 7B model with its AdamW moments is ~90 GB
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                         timeout=datetime.timedelta(minutes=30))
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    return Distributed(torch.distributed.get_rank(), world, fsdp, device)


def end_distributed():
    """Leave the torchrun job, if any, all ranks together: a rank that tears gloo down while rank 0 still
    writes a checkpoint can abort at exit."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# FSDP


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None = None, device: str = "cpu") -> torch.nn.Module:
    """Shard `model` (our Transformer, optionally with LoRA adapters) across all ranks in place, each
    rank's shards going to `device` ("cpu", "cuda"): one FSDP unit per decoder block, and the root
    (embedding, final norm, head). Weights are gathered in compute_dtype and gradients reduced in fp32.
    Gathering fp32 master weights in bf16 halves the traffic and the gathered copy, and lets LoRA's
    bf16 base and fp32 adapters share a unit (FSDP needs one dtype per unit); gathered in fp32, every
    forward would also keep autocast's bf16 copy of the whole model (its cast cache)."""
    mesh = init_device_mesh(device.split(":")[0], (torch.distributed.get_world_size(),))
    # a sparse embedding gradient cannot be reduce-scattered; FSDP needs it dense
    model.embed_tokens.sparse = False
    # cast_forward_inputs off: our forward casts under autocast itself, and the cast would rebuild the
    # argument containers the sampler's KV cache travels in
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # the root keeps its weights gathered from forward to the end of backward: the output head runs
    # outside forward() (grpo.token_logprobs), and again when its checkpointed chunks are recomputed
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Our losses are normalised over the global batch already (grpo.aggregation_weights and
            # train.sft count every rank's tokens), so the ranks' gradients must be summed, not averaged.
            m.set_gradient_divide_factor(1.0)
            # gloo cannot pre-multiply by a factor inside its reduce-scatter; a plain sum is what we want anyway
            m.set_force_sum_reduction_for_comms(True)
    # forward_grouped (grpo's shared-prompt pass) is a second entry point besides forward: gather for it too
    register_fsdp_forward_method(model, "forward_grouped")
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether shard() has been applied to `model`."""
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Hold every parameter of a sharded model unsharded while the block runs, so forwards need no
    collective: each rank may then run a different number of them (sampling, evaluation). Every rank
    must enter it. Unchanged for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()  # all-gathers this unit's weights
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not model, recurse=False)  # as shard() set them
            m.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state dict with every tensor whole, on rank 0; None on the other ranks, which must
    still call it when the model is sharded (each tensor is gathered from all of them). Gathered one
    tensor at a time and moved to the CPU, so a GPU holds at most one whole tensor beyond its shards."""
    state = {}
    for name, t in model.state_dict().items():
        t = _full(t.detach())
        if _rank() == 0:
            state[name] = t.cpu()
    return state if _rank() == 0 else None


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every moment whole, on rank 0 (state {} on the other ranks, which
    must still call it for a sharded model)."""
    opt = optimizer.state_dict()
    state = {}
    for i in sorted(opt["state"]):  # the same order on every rank: each gather pairs up
        moments = {k: _full(v) for k, v in opt["state"][i].items()}
        if _rank() == 0:
            state[i] = {k: v.cpu() for k, v in moments.items()}
    return {"state": state, "param_groups": opt["param_groups"]}


def shard_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (read whole on every rank) cut to this rank's shard of `like`, a sharded tensor;
    returned unchanged when `like` is not sharded. No communication: every rank has the data."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)

