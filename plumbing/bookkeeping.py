"""What a run does around the lesson's two loops (train.sft and train.train_grpo), so that those loops
read as the algorithm.

- `Run.after_step` and `Run.after_sft_batch`: log, validate, save and stop as the flags ask, and stop a
  run whose weights diverged (exit 3) or warn when its rewards give GRPO nothing to compare.
- `RunLog`: metrics.jsonl and samples.txt.
- `GracefulStop`: Ctrl-C and SIGTERM become a stop after the step in progress, with a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from grpo import OneProcess
from plumbing.runs import WriteError, written_file

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
# Stopping: signals, divergence


class Abandoned(Exception):
    """A stop request that arrived during an evaluation: the evaluation is given up at once (it holds nothing
    worth saving) and the run stops from the last consistent state."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM, what schedulers send, asks the loops to stop after the step in
    progress, so a checkpoint never holds a half-applied update; a second signal stops at once.
    During an evaluation (inside `abandoning`) the first signal gives the evaluation up at once: the
    handler raises Abandoned, which the stages turn into a save of the last step and exit 130, and
    --resume does the evaluation again. A run that saves nothing (--eval-only, --dry-run: saves=False)
    stops at the first signal."""

    def __init__(self, saves: bool = True):
        self.saves = saves
        self.requested: str | None = None  # the first signal's name
        self.evaluating: str | None = None  # the evaluation running now, if any

    def __call__(self, signum, frame):
        if self.requested or not self.saves:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.evaluating:
            tqdm.write(f"{self.requested}: abandoning {self.evaluating} (send it again to stop at once, unsaved)",
                       file=sys.stderr)
            raise Abandoned(self.evaluating)
        tqdm.write(f"{self.requested}: stopping after this step to save a checkpoint "
                   "(send it again to stop at once, unsaved)", file=sys.stderr)

    @contextlib.contextmanager
    def abandoning(self, what: str):
        """The block is an evaluation named `what`: a stop request gives it up (Abandoned), also one that
        came before it started."""
        if self.requested and self.saves:
            raise Abandoned(what)
        outer, self.evaluating = self.evaluating, what
        try:
            yield
        finally:
            self.evaluating = outer

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


FLAT_WINDOW = 10  # GRPO steps over which the share of groups with equal rewards is averaged
FLAT_SHARE = 0.9  # ... and the share that means GRPO is getting almost no signal


class FlatWatch:
    """Over the last FLAT_WINDOW GRPO steps: the share of groups whose rewards were all equal, and the ratings
    sampled. One line when that share averages FLAT_SHARE or more (then not again until it has fallen)."""

    def __init__(self):
        self.flat = deque(maxlen=FLAT_WINDOW)  # frac_reward_zero_std of each step
        self.ratings = deque(maxlen=FLAT_WINDOW)  # Counter of the valid sampled ratings of each step
        self.warned = False

    def update(self, step: int, frac_zero_std: float, rewards) -> str | None:
        """After GRPO step `step`: its share of groups with equal rewards and its rewards (reczero.Reward)."""
        self.flat.append(frac_zero_std)
        self.ratings.append(Counter(r.rating for r in rewards if r.valid))
        share = sum(self.flat) / len(self.flat)
        if len(self.flat) < FLAT_WINDOW or share < FLAT_SHARE:
            self.warned = False
            return None
        if self.warned:
            return None
        self.warned = True
        counts = sum(self.ratings, Counter())
        rating, times = counts.most_common(1)[0] if counts else (None, 0)
        sampled = (f"; {times / sum(counts.values()):.0%} of the valid samples rated {rating:g}" if counts
                   else "; no sample was in the format")
        return (f"warning: step {step}: over the last {FLAT_WINDOW} steps {share:.0%} of the groups had equal "
                f"rewards{sampled}: GRPO gets almost no signal, and the policy may have settled on one answer "
                "(--filter-groups draws more prompts instead of training on such groups)")


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
    ranks: object  # grpo.OneProcess, or parallel.Distributed under torchrun
    log: RunLog
    state: object
    stop: GracefulStop | None
    validate: Callable
    save: Callable
    restore: Callable
    bar: tqdm | None = None
    bad_steps: int = 0  # steps (or SFT batches) in a row skipped for a non-finite loss or gradient
    flat_steps: int = 0  # steps in a row in which every group's rewards were equal: no gradient
    flat_watch: FlatWatch = field(default_factory=FlatWatch)  # nearly all groups tied, over many steps

    @staticmethod
    def alone(log: Callable = lambda record: None) -> "Run":
        """A Run for a loop called on its own (a notebook, a test): one process; records go to `log`;
        nothing is validated, saved or restored, and no signal stops it."""

        def nothing(*args):
            pass

        cfg = SimpleNamespace(sft_save_every=math.inf, steps=0)
        return Run(cfg, Path("."), OneProcess(), log, SimpleNamespace(step=0, sft_step=None, notes=[], validation_due=False), None, nothing,
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

    def no_cold_start(self, batches: int):
        """The SFT ended without applying any of its `batches` (each skipped as non-finite): stop, exit 3."""
        diverged(f"the cold-start SFT applied none of its {batches} batches (each had a non-finite loss or "
                 "gradient), so its model would be the starting weights, not a cold start.", "--sft-lr")

    # -- GRPO (train.train_grpo)

    def before_grpo(self, model, optimizer):
        """The starting point of the validation curve (after the cold start, if any), or a validation a stop
        request abandoned; the progress bar."""
        if (self.state.step == 0 or self.state.validation_due) and self.cfg.steps > 0:
            model.eval()
            self._validate(model, optimizer)
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
        # most groups tied for many steps: the policy may have settled on one rating (plumbing/collapse.py)
        tied = metrics.get("filter_zero_std_share", metrics["frac_reward_zero_std"])  # of all drawn groups
        if (line := self.flat_watch.update(n, tied, samples[2])) and self.ranks.rank == 0:
            tqdm.write(line, file=sys.stderr)
            self.state.notes.append(line)
        if state.step % cfg.sample_every == 0:
            examples, texts, rewards, batch = samples
            self.log.sample(state.step, examples, texts, rewards, batch.prompt_index.tolist())
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            self._validate(model, optimizer)
        due = state.step % cfg.save_every == 0 or state.step == cfg.steps
        if due and not self.bad_steps:
            self.save(model, optimizer)  # never right after a non-finite step: the weights may be the cause
        if self.stopping() and state.step < cfg.steps:  # at the last step the run simply finishes
            self._stop_now(model, optimizer, due, f"at step {state.step}")
        if state.step == cfg.steps:
            self.bar.close()

    def _validate(self, model, optimizer):
        """validate(model); a stop request during it gives it up: the step is saved with its validation
        still due (--resume does it first) and the run exits 130."""
        try:
            self.validate(model)
        except Abandoned:
            self.state.validation_due = True
            self._stop_now(model, optimizer, False, f"at step {self.state.step}, before its validation")
        self.state.validation_due = False

    def _warn_no_signal(self):
        fix = ("the cold start did not teach it: more traces or SFT (--cold-start-size, --sft-epochs, --sft-lr)"
               if self.cfg.mode == "recone" else "RecZero needs a model that already follows the format "
               "instructions: use --mode recone (a cold start teaches the format) or a larger instruct model")
        tqdm.write(f"warning: {NO_SIGNAL_STEPS} steps without a single completion in the four-tag format: every "
                   f"reward is the format penalty, so GRPO has nothing to compare and the weights do not move; "
                   f"{fix}.", file=sys.stderr)
