"""One run per output folder, and files written whole or not at all.

A training run keeps everything in its folder (--out): checkpoints, the cold start and its traces,
metrics.jsonl, predictions, results. Two runs writing into one folder would mix their records and
replace each other's checkpoints without a word, so:

- A run holds a lock on its folder for as long as it runs (fcntl.flock on OUT/.lock, which holds its
  PID). A second run on the same folder stops at once, naming the holder, and so does --resume of a
  checkpoint whose run is still going. The kernel drops the lock when the process ends, however it
  ends: a lock file that still names a PID while nobody holds it was left by a killed run, and is
  taken over with a message.
- A new run refuses a folder that holds another run's files (RUN_FILES), unless told --overwrite,
  which removes them first, so nothing of the old run can pass for the new one's (a checkpoint to
  resume, a cold start used as the KL reference). A run resumed in its own folder continues there.
- --eval-only writes only into OUT/eval/ (its own metrics.jsonl, predictions/ and results.md,
  replaced by the next evaluation); --dry-run writes into a temporary directory, never into --out.

Every file is written under a temporary name beside its final one and renamed into place
(written_file, written_dir), so a reader never sees half a file and a kill leaves the previous
version whole. A write that fails (a full disk, a file-size limit) removes its temporary file or
folder and raises WriteError: one line naming the file, which train.py prints before exiting (2).

The rest is what a run does around the lesson's two loops (train.sft and train.train_grpo), so that
those loops read as the algorithm: `Run.after_step` and `Run.after_sft_batch` log, validate, save and
stop as the flags ask, and stop a run whose weights diverged; `RunLog` writes metrics.jsonl and
samples.txt; `GracefulStop` turns Ctrl-C and SIGTERM into a stop after the step in progress; and
`OneProcess` is what the lesson asks of the other processes when there are none (each call returns
its input; under torchrun plumbing/parallel.Distributed answers the same calls).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
from tqdm import tqdm


class WriteError(Exception):
    """A file of the run that could not be written (a full disk, a file-size limit); names the file."""


class FolderError(Exception):
    """A folder this run may not write into: another run holds it, or holds files there."""


# -----------------------------------------------------------------------------
# Writing files and folders whole


def _reason(e: Exception) -> str:
    """Why a write failed, in the OS's words: libraries written in Rust (safetensors, tokenizers) end
    their messages with "(os error N)"."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    rust = re.search(r"\(os error (\d+)\)", str(e))
    return os.strerror(int(rust.group(1))) if rust else str(e) or type(e).__name__


def _remove_leftovers(path: Path):
    """Remove temporary files and folders of earlier writes of `path` that a kill interrupted: on a
    full disk they would keep it full, and the next write would fail the same way."""
    for leftover in path.parent.glob(glob.escape(path.name) + ".tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def written_file(path, mode: str = "w") -> Iterator:
    """Open `path` for writing under a temporary name (`path.tmp-PID`), renamed to `path` when the
    block ends without error. On a failed write the temporary file is removed and WriteError names
    `path`; an earlier version of `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: could not be written: {_reason(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    """`text` into `path`, whole or not at all (written_file)."""
    with written_file(path) as f:
        f.write(text)


def recover(path) -> Path:
    """A run killed between replace_dir's two renames leaves only `path.old`, the last whole
    folder: put it back in place. Returns `path`."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        try:
            os.replace(old, path)
            print(f"{path}: recovered from {old.name} (a run was killed while replacing it)")
        except FileNotFoundError:  # another rank of a torchrun job put it back first
            if not path.is_dir():
                raise
    return path


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


@contextlib.contextmanager
def written_dir(path) -> Iterator[Path]:
    """A temporary directory beside `path` to fill, moved into its place (replace_dir) when the block
    ends without error. On a failed write (an OSError, or safetensors' own error for the same) the
    temporary directory is removed and WriteError names `path`; the previous folder stays whole."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        _remove_leftovers(path)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        yield tmp
        replace_dir(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as a SafetensorError
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = " (the previous one is intact)" if path.exists() else ""
        raise WriteError(f"{path}: could not be written{kept}: {_reason(e)}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# -----------------------------------------------------------------------------
# The lock: one process per folder

LOCK = ".lock"


def _holder(fd: int) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"process {pid}" if pid else "another process"


def lock_holder(folder) -> str | None:
    """Who holds `folder`'s lock ("process 1234"), or None when no live process does."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: no run ever held this folder
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with a holder's exclusive lock
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)  # also drops the probe's own lock


@contextlib.contextmanager
def locked(folder) -> Iterator[Path]:
    """Hold `folder`'s lock for the block (creating the folder); FolderError when a live process holds
    it. A PID left in the lock file by a process that no longer holds it (killed) is taken over with a
    warning. On leaving, the PID is erased, so a PID found there always means a run that was killed."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FolderError(f"--out {folder}: cannot be used as the run's folder: {_reason(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise FolderError(f"{folder} is in use: {holder} is running in it (it holds {folder / LOCK}); "
                          "wait for it to end, or give this run another --out") from None
    try:
        if stale := os.pread(fd, 32, 0).decode(errors="replace").strip():
            print(f"warning: {folder / LOCK}: process {stale} held this folder and ended without releasing "
                  "it (killed?); taking it over", file=sys.stderr)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            raise WriteError(f"{folder / LOCK}: could not be written: {_reason(e)}") from None
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a clean exit: nothing for the next run to report
        os.close(fd)  # releases the lock


# -----------------------------------------------------------------------------
# Which folder a run writes into

# What a training run writes into --out (and the .old / .tmp-* leftovers of their atomic writes)
RUN_FILES = ("checkpoint", "cold_start", "start", "best", "tokenizer", "predictions", "cold_start_traces.jsonl",
             "metrics.jsonl", "samples.txt", "results.md", "curves.png")


def run_files(out: Path) -> list[Path]:
    """The files and folders of a training run in `out` (RUN_FILES and their leftovers)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if re.sub(r"\.(old|tmp-.*)$", "", p.name) in RUN_FILES)


def _make_room(out: Path, overwrite: bool, resume: str | None):
    """A training run's check of its folder (holding its lock): a folder with another run's files is
    refused, or emptied of them with `overwrite`; a run resumed in its own folder continues there."""
    if resume and Path(resume).resolve().parent == out.resolve():  # the run this checkpoint belongs to
        if overwrite:
            raise FolderError(f"--overwrite would delete the run that --resume {resume} continues")
        return
    found = run_files(out)
    if not found:
        return
    names = ", ".join(p.name + "/" * p.is_dir() for p in found)
    if not overwrite:
        again = f"continue it with --resume {out / 'checkpoint'}, " if (out / "checkpoint").is_dir() else ""
        raise FolderError(f"--out {out} holds another run ({names}): {again}replace it with --overwrite, "
                          "or give another --out")
    for p in found:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    print(f"--overwrite: removed the earlier run's {names} from {out}", file=sys.stderr)


@contextlib.contextmanager
def run_folder(out, *, eval_only: bool = False, dry_run: bool = False, overwrite: bool = False,
               resume: str | None = None, rank: int = 0) -> Iterator[Path]:
    """The folder a run writes into, held for the block: --out for training (locked, and checked by
    _make_room), OUT/eval for --eval-only (locked), a temporary directory for --dry-run (removed
    after). Under torchrun only rank 0 writes, so only rank 0 locks and checks."""
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
            yield Path(tmp)
        return
    folder = Path(out) / "eval" if eval_only else Path(out)
    if rank != 0:
        yield folder
        return
    with locked(folder):
        if not eval_only:
            _make_room(folder, overwrite, resume)
        yield folder


# -----------------------------------------------------------------------------
# The run's log

class RunLog:
    """metrics.jsonl (one JSON object per line, flushed at once) and samples.txt, rank 0 only.

    Resuming at GRPO step k keeps the records up to step k and drops any written after the
    checkpoint, the baselines (the resumed run logs them again) and a partial line left by a killed
    run. Resuming in the cold-start SFT at batch b (`resume_sft_batch`) keeps only the cold start's
    record and the SFT epochs that ended by batch b: everything after them is done again. The kept
    records are rewritten whole (runs.written_file), so a failed write loses none of them; a record
    that cannot be written (a full disk) is a WriteError naming the file."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None = None, resume_sft_batch: int | None = None):
        self.enabled = enabled
        if enabled:
            self.path, self.samples_path = out / "metrics.jsonl", out / "samples.txt"
            kept = []
            if resume_step is not None and self.path.exists():
                for line in open(self.path, encoding="utf-8", errors="replace"):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # cut off by a kill mid-write
                        continue
                    if resume_sft_batch is not None:  # resumed in the cold start: GRPO has not started
                        keep = record.get("stage") == "cold_start" or (
                            record.get("stage") == "sft" and record.get("batch", 0) <= resume_sft_batch)
                    else:
                        keep = record.get("step", 0) <= resume_step and record.get("stage") != "baseline"
                    if keep:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with written_file(self.path) as f:
                f.writelines(kept)
            self.metrics = self._open(self.path, "a")
            self.samples, self.samples_mode = None, "a" if resume_step is not None else "w"  # opened when used

    @staticmethod
    def _open(path: Path, mode: str):
        try:
            return open(path, mode, encoding="utf-8")
        except OSError as e:
            raise WriteError(f"{path}: could not be opened for writing: {e.strerror}") from None

    def _write(self, f, path: Path, text: str):
        try:
            f.write(text)
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                f.close()  # drops what could not be written, so exiting does not try it again
            raise WriteError(f"{path}: could not be written: {e.strerror or e}") from None

    def __call__(self, record: dict):
        if self.enabled:
            self._write(self.metrics, self.path, json.dumps(record) + "\n")

    def sample(self, step: int, examples, texts: list[str], rewards: list, prompt_index: list[int],
               k: int = 2):
        """Append the first completion of each of the first k prompts to samples.txt (rewards: reczero.Reward)."""
        if self.enabled:
            first = {}
            for row, p in enumerate(prompt_index):
                first.setdefault(p, row)
            if self.samples is None:
                self.samples = self._open(self.samples_path, self.samples_mode)
            text = "".join(f"=== step {step} | truth {examples[p].label:g} | reward {rewards[first[p]].total:.3f}\n"
                           f"{texts[first[p]]}\n" for p in sorted(first)[:k])
            self._write(self.samples, self.samples_path, text)


# -----------------------------------------------------------------------------
# The other processes, when there are none


@dataclass
class OneProcess:
    """What the lesson asks of the other ranks, answered for a run of one process: every sum is its
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
# Stopping: signals, divergence


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM, what schedulers send, asks the loops to stop after the step in
    progress, so a checkpoint never holds a half-applied update; a second signal stops at once.
    A run that saves nothing (--eval-only, --dry-run: saves=False) stops at the first signal."""

    def __init__(self, saves: bool = True):
        self.saves = saves
        self.requested: str | None = None  # the first signal's name

    def __call__(self, signum, frame):
        if self.requested or not self.saves:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        tqdm.write(f"{self.requested}: stopping after this step to save a checkpoint "
                   "(send it again to stop at once, unsaved)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self):
        """Route SIGINT and SIGTERM here while the block runs (signals reach the main thread only:
        elsewhere, e.g. train.main called from a worker thread, nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


NO_SIGNAL_STEPS = 3  # flat steps with no formatted completion before the run says RL cannot start
MAX_BAD_STEPS = 3  # consecutive non-finite steps (or SFT batches) before the run stops


def diverged(msg: str, lr_flag: str = "--lr"):
    """Stop a run whose weights can no longer be trusted: nothing is saved, exit code 3."""
    name = lr_flag.lstrip("-").replace("-", "_")
    tqdm.write(f"train.py: error: {msg} Nothing was saved after it; resume from the last checkpoint written "
               f"(if any) with a lower learning rate: --resume OUT/checkpoint --resume-override {name} {lr_flag} ... "
               "(check its validation records in metrics.jsonl first: it may hold a policy that had already "
               "collapsed; with --select best, OUT/best/ holds the best validated weights, a --model for a new run)",
               file=sys.stderr)
    sys.exit(3)


# -----------------------------------------------------------------------------
# Around each step of the lesson's loops


@dataclass
class Run:
    """A training run as the lesson's loops see it. plumbing/stages.py builds it, with three callbacks:
    validate(model) scores the validation split, if any (and keeps the best weights with --select
    best); save(model, optimizer) writes OUT/checkpoint; restore(optimizer, loop) reads AdamW's moments
    when --resume continues that loop ("sft" or "grpo"). `state` is the checkpoints.TrainerState,
    `cfg` the flags (cli.RunConfig)."""

    cfg: object
    out: Path
    ranks: object  # OneProcess, or parallel.Distributed under torchrun
    log: RunLog
    state: object
    stop: GracefulStop | None
    validate: Callable
    save: Callable
    restore: Callable
    bar: tqdm | None = None
    bad_steps: int = 0  # steps (or SFT batches) in a row skipped for a non-finite loss or gradient
    flat_steps: int = 0  # steps in a row in which every group's rewards were equal: no gradient

    @staticmethod
    def alone(log: Callable = lambda record: None) -> "Run":
        """A Run for a loop called on its own (a notebook, a test): one process; records go to `log`;
        nothing is validated, saved or restored, and no signal stops it."""

        def nothing(*args):
            pass

        cfg = SimpleNamespace(sft_save_every=math.inf, steps=0)
        return Run(cfg, Path("."), OneProcess(), log, SimpleNamespace(step=0, sft_step=None), None, nothing,
                   nothing, nothing)

    def stopping(self) -> bool:
        """Whether any rank was asked to stop: every rank stops at the same step, or the others would
        wait for it forever."""
        return self.ranks.sum(float(self.stop is not None and self.stop.requested is not None)) > 0

    def _stop_now(self, model, optimizer, saved: bool, where: str, cold_start: bool = False):
        """Save (unless just saved, or the last step was not finite) and exit 130; every rank calls it."""
        if self.bar is not None:
            self.bar.close()
        if self.bad_steps:  # never right after a non-finite step: the weights may be the cause
            if self.ranks.rank == 0:
                tqdm.write(f"stopping {where}" + (", unsaved: it was not finite" if cold_start else ""),
                           file=sys.stderr)
        elif not saved:
            if self.ranks.rank == 0:
                resume = f" (--resume {self.out / 'checkpoint'} continues from there)" if cold_start else ""
                tqdm.write(f"stopping {where}: saving {self.out / 'checkpoint'}{resume}", file=sys.stderr)
            self.save(model, optimizer)
        elif self.ranks.rank == 0:
            tqdm.write(f"stopping {where}", file=sys.stderr)
        self.ranks.barrier()  # torchrun ends the others when one rank exits: not while rank 0 writes
        sys.exit(130)

    def _bad_step(self, weights_ok: bool, what: str, lr_flag: str, in_a_row: str):
        """A step that was skipped for a non-finite loss or gradient, or left a weight non-finite: stop the
        run at once for the latter, after MAX_BAD_STEPS skipped ones in a row for the former."""
        if not weights_ok:
            diverged(f"{what}: the update made weights non-finite; they are discarded.", lr_flag)
        self.bad_steps += 1
        tqdm.write(f"warning: {what}: non-finite loss or gradient, update skipped", file=sys.stderr)
        if self.bad_steps == MAX_BAD_STEPS:
            diverged(f"{MAX_BAD_STEPS} {in_a_row} had a non-finite loss or gradient: the weights have diverged.",
                     lr_flag)

    # -- the cold-start SFT (train.sft)

    def after_sft_batch(self, model, optimizer, batch: int, batches: int, stepped: bool, epoch_end: dict | None):
        """After SFT batch `batch` of `batches`: check it, log the epoch's last batch (epoch_end, its
        record), save every --sft-save-every batches and at the end, stop when asked."""
        weights_ok = not stepped or self.ranks.all_finite([p for p in model.parameters() if p.requires_grad])
        if stepped and weights_ok:
            self.bad_steps = 0
        else:
            self._bad_step(weights_ok, f"cold-start SFT batch {batch}", "--sft-lr",
                           f"cold-start SFT batches in a row (to batch {batch})")
        if epoch_end is not None:
            self.log(epoch_end)
        self.state.sft_step = batch
        if self.stopping():
            optimizer.zero_grad(set_to_none=True)
            self._stop_now(model, optimizer, False, f"in the cold-start SFT at batch {batch}", cold_start=True)
        if not self.bad_steps and (batch % self.cfg.sft_save_every == 0 or batch == batches):
            optimizer.zero_grad(set_to_none=True)
            self.save(model, optimizer)  # at the end too: a kill while the cold start is written loses no batch

    # -- GRPO (train.train_grpo)

    def before_grpo(self, model):
        """The starting point of the validation curve (after the cold start, if any); the progress bar."""
        if self.state.step == 0 and self.cfg.steps > 0:
            model.eval()
            self.validate(model)
        if self.state.step < self.cfg.steps:
            self.bar = tqdm(total=self.cfg.steps, initial=self.state.step, desc="GRPO", disable=self.ranks.rank != 0)

    def after_step(self, model, optimizer, metrics: dict, seconds: tuple[float, float], samples: tuple):
        """After a GRPO step: check, log (metrics, `seconds` of sampling and update, and every --sample-every
        steps the `samples`: examples, texts, rewards, batch), validate, save, stop as the flags ask."""
        cfg, state, n = self.cfg, self.state, self.state.step + 1
        if metrics["skipped"] or not metrics["weights_finite"]:
            self._bad_step(bool(metrics["weights_finite"]), f"step {n}", "--lr", f"steps in a row (to step {n})")
        else:
            self.bad_steps = 0
        state.step = n
        metrics.update(stage="grpo", step=state.step, time_sampling=seconds[0], time_update=seconds[1])
        self.log(metrics)
        self.bar.update()
        self.flat_steps = self.flat_steps + 1 if metrics["frac_reward_zero_std"] == 1.0 else 0
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", mae=f"{metrics['train_mae']:.2f}",
                             **({"signal": "none (all rewards in each group equal)"} if self.flat_steps else {}))
        if self.flat_steps == NO_SIGNAL_STEPS and metrics["format_valid"] == 0 and self.ranks.rank == 0:
            self._warn_no_signal()
        if state.step % cfg.sample_every == 0:
            examples, texts, rewards, batch = samples
            self.log.sample(state.step, examples, texts, rewards, batch.prompt_index.tolist())
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            self.validate(model)
        due = state.step % cfg.save_every == 0 or state.step == cfg.steps
        if due and not self.bad_steps:
            self.save(model, optimizer)  # never right after a non-finite step: the weights may be the cause
        if self.stopping() and state.step < cfg.steps:  # at the last step the run simply finishes
            self._stop_now(model, optimizer, due, f"at step {state.step}")
        if state.step == cfg.steps:
            self.bar.close()

    def _warn_no_signal(self):
        fix = ("the cold start did not teach it: more traces or SFT (--cold-start-size, --sft-epochs, --sft-lr)"
               if self.cfg.mode == "recone" else "RecZero needs a model that already follows the format "
               "instructions: use --mode recone (a cold start teaches the format) or a larger instruct model")
        tqdm.write(f"warning: {NO_SIGNAL_STEPS} steps without a single completion in the four-tag format: every "
                   f"reward is the format penalty, so GRPO has nothing to compare and the weights do not move; "
                   f"{fix}.", file=sys.stderr)
