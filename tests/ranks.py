"""Tests on several processes: gloo ranks on the CPU, spawned from a test, as torchrun would start them.

run_ranks(tmp_path, fn, *args) runs fn(dist, *args) on each rank (dist: a parallel.Distributed with
fsdp=True, so helpers that shard when dist.fsdp do) and returns the tensors rank 0's call returns;
torchrun(argv) runs train.main(argv) on each rank. A rank that fails ends the test at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plumbing.parallel import Distributed, end_distributed


def _worker(rank, world, init_file, out_file, fn, args):
    """One gloo rank: run fn(dist, *args); rank 0 saves the tensors it returns to out_file."""
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    code = 0
    try:
        result = fn(Distributed(rank, world, fsdp=True), *args)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in result.items()}, out_file)
        end_distributed()
    except BaseException:  # leave at once: the other rank's next collective then fails instead of waiting
        import traceback

        traceback.print_exc()
        code = 1
    # Leave without the interpreter's teardown: gloo's threads can abort ("terminate called without an
    # active exception", exit -6) while C++ statics are destroyed, after the work is done and checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _join(procs, timeout: float):
    """Wait for every rank; one that fails leaves the others waiting in a collective: end them."""
    for p in procs:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(code == 0 for code in codes), f"rank exit codes {codes} (None: still running after {timeout} s)"


def run_ranks(tmp_path: Path, fn, *args, world: int = 2) -> dict[str, torch.Tensor]:
    """fn(dist, *args) on `world` gloo processes; what rank 0 returns."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = tmp_path / "rank0.safetensors"
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / "rendezvous"), str(out), fn, args))
             for r in range(world)]
    for p in procs:
        p.start()
    _join(procs, 180)
    return load_file(out)


def _train_rank(rank, world, port, argv):
    """One rank of a torchrun-like job running train.main(argv) with varied rewards (tiny_runs)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_runs import varied_rewards

    import train

    varied_rewards(type("Patch", (), {"setattr": staticmethod(setattr)}))
    code = 0
    try:
        train.main(argv)
    except SystemExit as e:
        code = e.code or 0
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see _worker


def torchrun(argv: list[str], world: int = 2):
    """train.py's main(argv) on `world` processes, as `torchrun --nproc-per-node world` would run it."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_train_rank, args=(r, world, port, argv)) for r in range(world)]
    for p in procs:
        p.start()
    _join(procs, 300)
