"""Run folders and writes (plumbing/runs.py): a lock left by a killed run is taken over, --overwrite
removes the earlier run's files only, --dry-run writes nothing into --out, and a full disk (a file-size
limit) is one line naming the file, with no temporary file or folder left behind.
(train.py's own folder tests, on a finished tiny run, are in test_train.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import TINY

import train
from plumbing import runs

ROOT = Path(__file__).resolve().parents[1]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    """flock is released by the kernel however a process ends; the PID it wrote stays only when it was
    killed: the next run takes the folder over and says so. A clean exit leaves nothing to report."""
    (tmp_path / runs.LOCK).write_text("4194303")  # written by a run that no longer holds the lock
    with runs.locked(tmp_path):
        assert runs.lock_holder(tmp_path) == f"process {os.getpid()}"
    assert "process 4194303 held this folder and ended without releasing it" in capsys.readouterr().err
    assert runs.lock_holder(tmp_path) is None and (tmp_path / runs.LOCK).read_text() == ""
    with runs.locked(tmp_path):
        pass
    assert "taking it over" not in capsys.readouterr().err


def test_overwrite_removes_the_earlier_runs_files_and_only_those(tmp_path, capsys):
    """--overwrite empties the folder of the earlier run (so neither its checkpoint nor its cold start can
    pass for the new run's), leaving --eval-only's eval/ and the user's own files; a resumed run
    continues in its own folder, where --overwrite is refused."""
    for d in ("checkpoint", "cold_start", "checkpoint.old", "cold_start.tmp-x1", "eval"):
        (tmp_path / d).mkdir()
    for f in ("metrics.jsonl", "cold_start_traces.jsonl", "notes.txt"):
        (tmp_path / f).write_text("x")
    with pytest.raises(runs.FolderError, match="holds another run .checkpoint/, checkpoint.old/, cold_start/"):
        with runs.run_folder(tmp_path):
            pass
    with runs.run_folder(tmp_path, resume=str(tmp_path / "checkpoint")):  # its own run: continued
        pass
    with pytest.raises(runs.FolderError, match="--overwrite would delete the run"):
        with runs.run_folder(tmp_path, resume=str(tmp_path / "checkpoint"), overwrite=True):
            pass
    with runs.run_folder(tmp_path, overwrite=True) as out:
        assert out == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "eval", "notes.txt"]
    assert "--overwrite: removed the earlier run's checkpoint/" in capsys.readouterr().err


def test_dry_run_writes_nothing_into_out(tmp_path):
    """--dry-run --out RUN used to retrain RUN/tokenizer under a running job: its demo tokenizer goes to a
    temporary folder now, and --out is not even created."""
    train.main(TINY + ["--dry-run", "--out", str(tmp_path / "plan")])
    assert not (tmp_path / "plan").exists()


# Every writer of a run, under a file-size limit (SIGXFSZ ignored, so a write past it fails with EFBIG, as
# on a full disk), then a whole run whose first checkpoint does not fit.
FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import train
from data import Example, Item, Rating
from plumbing.report import write_predictions
from plumbing.bookkeeping import RunLog
from plumbing.runs import WriteError, write_text
from plumbing.teachers import Trace, save_traces
from plumbing.tokenizer import train_bpe
from tiny_runs import TINY

out = Path(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
ex = [Example(Rating(f"u{i}", "i", 4.0, i), Item("i"), [], [], 3.0, 3.0) for i in range(200)]
writers = {
    "traces": lambda: save_traces([Trace(e, "text " * 20, False) for e in ex], out / "traces.jsonl"),
    "predictions": lambda: write_predictions(out / "predictions" / "p.jsonl", ex, [4.0] * 200, [3.0] * 200),
    "metrics": lambda: RunLog(out, True)({"stage": "eval", "text": "x" * 5000}),
    "tokenizer": lambda: train_bpe(["the user likes drama and comedy"] * 50, out / "tokenizer", vocab_size=300),
    "results": lambda: write_text(out / "results.md", "| row |" * 1000),
}
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
for name, write in writers.items():
    try:
        write()
        print(json.dumps([name, "written"]))
    except WriteError as e:
        print(json.dumps([name, str(e)]))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # 1 MiB: the tokenizer and traces fit, weights do not
try:
    train.main(TINY + ["--steps", "1", "--out", str(out / "run")])
except SystemExit as e:
    print(json.dumps(["run", e.code]))
"""


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_files(tmp_path):
    """A file-size limit (what `mount -t tmpfs -o size=3m` does to a run) used to end in a
    SafetensorError or OSError traceback and a leftover *.tmp-* folder: every writer now says which
    file could not be written, in one line, and removes its temporary file or folder."""
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(ROOT), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = dict(json.loads(line) for line in done.stdout.splitlines() if line.startswith("["))
    assert results.pop("run") == 2, done.stderr[-3000:]
    files = {"traces": "traces.jsonl", "predictions": "predictions/p.jsonl", "metrics": "metrics.jsonl",
             "tokenizer": "tokenizer", "results": "results.md"}
    for name, message in results.items():
        assert message == f"{tmp_path / files[name]}: could not be written: File too large", (name, message)
    errors = [line for line in done.stderr.splitlines() if line.startswith("train.py: error:")]
    assert errors == [f"train.py: error: {tmp_path / 'run' / 'checkpoint'}: could not be written: File too large"]
    assert "Traceback" not in done.stderr
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert len((tmp_path / "run" / "cold_start_traces.jsonl").read_text().splitlines()) > 0  # written before, whole
