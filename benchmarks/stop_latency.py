"""How long a run takes to stop after Ctrl-C, in each phase where it used to wait for a whole evaluation.

    python benchmarks/stop_latency.py            # the demo, with an evaluation that takes minutes

Each case starts `train.py` on the embedded demo with evaluations sized to take minutes (1,000 validation
examples, 1,024 new tokens, RecZero from random weights, whose answers run to the cap), waits until the
named evaluation's progress bar has been showing for 3 seconds, sends SIGINT once and times the exit.
Before this project abandoned evaluations on a stop request, the same settings took 206-242 s to stop
during a validation (and a final test ran to its end). The table gives each case's seconds from the
signal to the exit, the exit code and the run's last line.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONG = ["--mode", "reczero", "--valid-size", "1000", "--max-new-tokens", "1024", "--eval-every", "1",
        "--synthetic-users", "1200"]
# (case, flags, the progress bar whose appearance says the phase has started, which appearance). The
# starting model's test (1,200 examples) comes before everything else; the second case shrinks it to reach
# the validation quickly. (Validation during GRPO takes the validation's path: tests/test_stop.py stops it
# at step 2.)
CASES = [("the starting model's test", ["--steps", "3"], "test (before RL):", 1),
         ("validation before step 1 (the start check)", ["--steps", "3", "--eval-size", "10"], "valid:", 1),
         ("the final test", ["--steps", "1", "--valid-size", "10"], "test (GRPO):", 1)]


def stop_during(flags: list[str], bar: str, nth: int, out: Path, threads: int = 2,
                wait: float = 3.0) -> tuple[float, int, str]:
    """Run train.py, SIGINT it `wait` s after the nth appearance of `bar` in its stderr; (seconds to exit
    after the signal, exit code, last line of stderr)."""
    cmd = [sys.executable, str(ROOT / "train.py"), *LONG, *flags, "--threads", str(threads), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines, sent = [], {}

    def read():
        for chunk in iter(lambda: proc.stderr.read(256), ""):
            lines.append(chunk)
            if not sent and "".join(lines).count(bar + "   0%") >= nth:  # tqdm's first render of that bar
                sent["at"] = time.time() + wait

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while "at" not in sent or time.time() < sent["at"]:
        if proc.poll() is not None:
            raise SystemExit(f"train.py ended before the phase began: {''.join(lines)[-400:]}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    start = time.time()
    code = proc.wait()
    seconds = time.time() - start
    reader.join(timeout=5)
    last = [line.strip() for line in "".join(lines).replace("\r", "\n").splitlines() if line.strip()]
    return seconds, code, last[-1] if last else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    print("| stopped during | seconds from SIGINT to exit | exit code | the run's last line |\n|---|---|---|---|")
    for name, flags, bar, nth in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, code, last = stop_during(flags, bar, nth, Path(tmp) / "run", args.threads)
        print(f"| {name} | {seconds:.1f} | {code} | {last[:160]} |", flush=True)


if __name__ == "__main__":
    main()
