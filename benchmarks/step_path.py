"""The code a reader must follow for one GRPO step, measured by running it (README: The lesson's size).

Runs the demo twice in this process, for 1 and then 2 GRPO steps, with validation, checkpoints and
samples only at each run's end (so both runs do them once), and counts, under a profiler switched on
for the GRPO loop (train.train_grpo), the calls of every function defined in the project's own files
(tests and benchmarks aside). A function called
more often in the second run is on the step's path; so is one whose calls into project code grow
(the loop that runs the step). Prints the files, functions and lines on that path: a function's lines
run from its `def` to its last line, docstring and comments included; on Python 3.11 a comprehension
is a function of its own, so its line counts twice.

    python benchmarks/step_path.py [--show] [--quick] [extra train.py flags]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train  # noqa: E402

# Small enough to run in seconds; every feature of the demo's step is still in use (KL reference,
# shared prompt passes, micro-batches, sampling).
SMALL = ["--synthetic-users", "200", "--cold-start-size", "64", "--sft-epochs", "1", "--eval-size", "8",
         "--valid-size", "8", "--prompts-per-step", "2", "--samples", "4", "--eval-every", "1000",
         "--save-every", "1000", "--sample-every", "1000", "--threads", "1"]
QUICK = SMALL[:3] + ["24"] + SMALL[4:] + ["--synthetic-users", "150", "--max-new-tokens", "24"]


def project_file(path: str) -> str | None:
    """The path relative to the project root of a project source file; None for anything else."""
    p = Path(path)
    if not p.is_absolute() or ROOT not in p.parents:
        return None
    rel = p.relative_to(ROOT)
    return None if rel.parts[0] in ("tests", "benchmarks", ".venv") else str(rel)


def calls(flags: list[str]) -> tuple[collections.Counter, dict]:
    """Run train.main(flags) under a profiler: calls per (file, function) and per (caller, callee) pair
    of project functions, and each function's (first line, last line)."""
    counts, spans = collections.Counter(), {}

    def key(code):
        return project_file(code.co_filename), code.co_qualname

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = key(frame.f_code)
        if callee[0] is None:
            return
        counts[callee] += 1
        if callee not in spans:
            lines = [line for _, _, line in frame.f_code.co_lines() if line is not None]
            spans[callee] = (frame.f_code.co_firstlineno, max(lines, default=frame.f_code.co_firstlineno))
        caller = frame.f_back
        while caller is not None and key(caller.f_code)[0] is None:
            caller = caller.f_back
        if caller is not None:
            counts[(key(caller.f_code), callee)] += 1
            spans.setdefault(key(caller.f_code), (caller.f_code.co_firstlineno, max(
                (line for _, _, line in caller.f_code.co_lines() if line is not None),
                default=caller.f_code.co_firstlineno)))

    def profiled(*args, **kwargs):  # only the GRPO loop: what runs before and after it is the same in both runs
        sys.setprofile(profile)
        try:
            return loop(*args, **kwargs)
        finally:
            sys.setprofile(None)

    err, loop = io.StringIO(), train.train_grpo
    with tempfile.TemporaryDirectory() as out:
        train.train_grpo = profiled
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                train.main(flags + ["--out", out])
        except SystemExit as e:
            tail = err.getvalue().strip()[-500:]
            raise SystemExit(f"step_path.py: train.py stopped (exit {e.code}): {tail}") from None
        finally:
            train.train_grpo = loop
    return counts, spans


def step_path(flags: list[str]) -> dict[str, list[tuple[str, int, int]]]:
    """{file: [(function, first line, lines)]} of every project function on one GRPO step's path."""
    one, _ = calls(flags + ["--steps", "1"])
    two, spans = calls(flags + ["--steps", "2"])
    grown = {k for k in two if two[k] > one.get(k, 0)}
    on = {k for k in grown if isinstance(k[0], str)} | {k[0] for k in grown if isinstance(k[0], tuple)}
    path = collections.defaultdict(list)
    for file, name in sorted(on):
        first, last = spans[(file, name)]
        path[file].append((name, first, last - first + 1))
    return dict(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--show", action="store_true", help="list each function with its first line and length")
    ap.add_argument("--quick", action="store_true", help="a smaller run (seconds): the test suite's")
    args, extra = ap.parse_known_args(argv)
    torch.set_num_threads(1)
    path = step_path((QUICK if args.quick else SMALL) + extra)
    total = 0
    for file, functions in sorted(path.items(), key=lambda kv: -sum(n for _, _, n in kv[1])):
        lines = sum(n for _, _, n in functions)
        total += lines
        print(f"{file}: {len(functions)} functions, {lines} lines")
        if args.show:
            for name, first, n in sorted(functions, key=lambda f: f[1]):
                print(f"    {first:5d} {name} ({n})")
    print(f"one GRPO step: {len(path)} files, {sum(map(len, path.values()))} functions, {total} lines")
    return path


if __name__ == "__main__":
    main()
