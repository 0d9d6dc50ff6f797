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
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError


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
    created = not folder.exists()
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
        if created and [p.name for p in folder.iterdir()] == [LOCK]:  # a run that failed its checks leaves nothing
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
                folder.rmdir()


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
