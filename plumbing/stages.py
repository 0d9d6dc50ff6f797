"""The stages of a training run, in the order train.main() runs them: build the run, score the
baselines, the cold start (RecOne), what GRPO needs besides the lesson (the reference model, the Run
that logs, validates, saves and stops around each step) and the final test. None of it is GRPO.

- session(): everything before the first stage and after the last: threads, device and dtypes, the
  run's folder (plumbing/runs.py: locked, --eval-only's and --dry-run's own), Ctrl-C and SIGTERM,
  autocast, the torchrun job, and one line for an error a user can fix (exit 2).
- build(): data, tokenizer, the memory plan (before any weight loads), the model, the trainer state
  of a resumed run. policy() is the one way a model is loaded: LoRA adapters, FSDP shards and
  gradient checkpointing as the flags ask.
- A run resumed from a checkpoint written in the cold start continues the SFT (its traces are kept
  in the folder, so no teacher is asked again); one written in GRPO continues GRPO with its AdamW
  moments and its step, every random draw replayed (train.step_generator).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lora import add_lora
from model import CheckpointError, Tokenizer
from plumbing.bookkeeping import Abandoned, GracefulStop, Run, RunLog
from plumbing.checkpoints import (
    BestSoFar,
    TrainerState,
    load_adapters,
    load_config,
    load_model,
    load_optimizer,
    mark_tested,
    save_checkpoint,
    save_model,
)
from plumbing.cli import RunConfig, fail, lora_targets, prompt_settings
from plumbing.collapse import COLLAPSED, collapse_note, labelled, start_check, start_line
from plumbing.experiment import (
    TaskData,
    cold_start_traces,
    demo_config,
    demo_model,
    demo_tokenizer,
    evaluation_plan,
    load_task,
    memory_plan,
    trace_fidelity,
)
from plumbing.memory import device_bytes, fits, prompt_length
from plumbing.parallel import end_distributed, setup_distributed, shard
from plumbing.readers import DataError
from plumbing.report import (
    baseline_rows,
    compare,
    describe,
    evaluate,
    interval_table,
    plot,
    rating_tokens,
    read_predictions,
    results_table,
)
from plumbing.runs import FolderError, WriteError, run_folder, write_text
from plumbing.teachers import Trace, TraceFidelity, load_traces, save_traces
from reczero import Prompter, RatingMetrics


@dataclass
class Setup:
    """What the stages share: built once by build()."""

    cfg: RunConfig
    out: Path  # the folder this run writes into (runs.run_folder)
    device: str
    weights_dtype: torch.dtype  # the weights' (fp32 master weights with --master-weights fp32)
    compute_dtype: torch.dtype  # autocast's, when it differs from weights_dtype
    stop: GracefulStop
    ranks: object  # grpo.OneProcess, or parallel.Distributed under torchrun
    task: TaskData
    tok: Tokenizer
    tok_dir: Path  # where the tokenizer files are read from, and copied into every checkpoint
    prompter: Prompter
    state: TrainerState
    log: RunLog
    fidelity: TraceFidelity | None
    start: Path | None  # the weights the run starts from (the demo's are built, on no disk)
    resume_phase: str | None  # "sft" or "grpo": the loop whose AdamW moments --resume restores

    @property
    def in_cold_start(self) -> bool:
        """RecOne and the cold start not yet done (a new run, or one resumed in its SFT)."""
        return self.cfg.mode == "recone" and (not self.cfg.resume or self.state.sft_step is not None)


@contextlib.contextmanager
def session(cfg: RunConfig):
    """The run's folder, signals, autocast and torchrun job around the stages; yields the Setup
    (None for --dry-run, which stops after the memory plan)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype) or auto_dtype(
        device, cfg.demo)
    weights = torch.float32 if cfg.master_weights == "fp32" else compute
    stop = GracefulStop(saves=not (cfg.eval_only or cfg.dry_run))
    folder = run_folder(cfg.out, eval_only=cfg.eval_only, dry_run=cfg.dry_run, overwrite=cfg.overwrite,
                        resume=cfg.resume, rank=int(os.environ.get("RANK", 0)))
    try:
        with stop.installed(), folder as out, torch.autocast(device.split(":")[0], dtype=compute,
                                                             enabled=compute != weights):
            yield build(cfg, out, device, weights, compute, stop)
        end_distributed()  # after every way the stages end (--dry-run and --eval-only end early)
    except KeyboardInterrupt:  # a second signal (or the first, in a run that saves nothing): stop here
        print(f"\ninterrupted{' again' if stop.saves else ''}: stopped without saving", file=sys.stderr)
        sys.exit(130)
    except Abandoned as e:  # a stop request during an evaluation that no step depends on (GRPO's own: Run)
        print(f"stopped: {e.what} abandoned; {_what_stands(Path(cfg.out) / 'checkpoint')}", file=sys.stderr)
        sys.exit(130)
    except (CheckpointError, DataError, WriteError, FolderError) as e:  # a folder in use, a full disk, a cut file
        fail(str(e))


def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """This CPU's bf16 matrix units (Intel AMX or AVX512-BF16; Arm's BF16 extension) by their flag names,
    empty when it has none, read from the kernel's CPU flags: the same answer every time, unlike timing a
    matmul, so a run's dtype (and its numbers) do not depend on how busy the machine was when it started."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:  # not Linux: assume none
        return []
    return sorted(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def auto_dtype(device: str, demo: bool) -> torch.dtype:
    """--dtype auto: bf16 on CUDA, and on a CPU with bf16 matrix units for a real checkpoint (SmolLM2-135M,
    forward and backward of 16 x 256 tokens on 2 cores with AMX: 5.5 s against 15.3 s in fp32); fp32
    otherwise, and always for the demo, whose numbers then stay the same on every machine."""
    if device.startswith("cuda") or (not demo and device == "cpu" and cpu_bf16_units()):
        return torch.bfloat16
    return torch.float32


def _what_stands(checkpoint: Path) -> str:
    """What a run stopped outside its loops can be resumed from, in words."""
    try:
        state = TrainerState.read(checkpoint)
    except CheckpointError:
        return "nothing was saved yet: start the run again (--overwrite)"
    where = "the end of the cold-start SFT" if state.sft_step is not None else f"step {state.step}"
    return f"{checkpoint} ({where}) stands: --resume {checkpoint} does it again"


def build(cfg: RunConfig, out: Path, device: str, weights_dtype, compute_dtype, stop: GracefulStop) -> Setup | None:
    """Data, tokenizer, trainer state and the memory plan; None after printing the plan with --dry-run."""
    ranks = setup_distributed(device, cfg.fsdp)
    try:
        task = load_task(cfg)
        state = TrainerState.read(cfg.resume) if cfg.resume else TrainerState(start_model=cfg.model)
        if cfg.resume and state.data_fingerprint not in (None, task.fingerprint):
            fail(f"--resume {cfg.resume}: the examples differ from those the checkpoint was trained on (data "
                 f"fingerprint {task.fingerprint}, checkpoint {state.data_fingerprint}): has --data changed?")
        state.data_fingerprint = task.fingerprint
        if cfg.resume or cfg.model:
            tok_dir = Path(cfg.resume or cfg.model)
            tok = Tokenizer(tok_dir)
            # with LoRA a resumed run rebuilds the frozen base the adapters were trained on
            start = Path(state.start_model if cfg.lora_rank and cfg.resume else tok_dir)
            config = load_config(start)
            tok.check_fits(config.vocab_size, tok_dir)
        else:  # the demo: a tokenizer trained on the synthetic text, a tiny random model
            # --dry-run: every rank trains its own, in its own temporary folder
            tok_dir = demo_tokenizer(task, prompt_settings(cfg, task.scale), out, 0 if cfg.dry_run else ranks.rank)
            ranks.barrier()
            tok, start = Tokenizer(tok_dir), None
            config = demo_config(tok.vocab_size, tok.turn_end_id)
        prompter = Prompter(tok, *prompt_settings(cfg, task.scale))
        if cfg.expected_rating:
            try:
                rating_tokens(tok, task.scale)
            except ValueError as e:  # a rating that is not one token, or half stars
                fail(str(e))
        plan = memory_plan(cfg, config, prompter, task, weights_dtype, compute_dtype, ranks.world, device)
        if ranks.rank == 0:
            print(plan.describe())
            print(evaluation_plan(cfg, task, prompt_length([prompter(e) for e in task.train[:256]])))
        if cfg.dry_run:
            return None
        if problem := fits(plan, device_bytes(device), evaluation=cfg.eval_only):  # scoring holds no gradients
            fail(problem)
        resumed = cfg.resume and not cfg.eval_only  # an evaluation starts its own log
        log = RunLog(out, ranks.rank == 0, state.step if resumed else None, state.sft_step if resumed else None)
    except (DataError, CheckpointError, OSError) as e:
        fail(str(e))
    phase = None if not cfg.resume or cfg.eval_only else ("sft" if state.sft_step is not None else "grpo")
    return Setup(cfg, out, device, weights_dtype, compute_dtype, stop, ranks, task, tok, tok_dir, prompter, state,
                 log, trace_fidelity(cfg, task), start, phase)


def policy(s: Setup, path: Path | None, adapters: Path | None = None, lora: bool = True, dtype=None):
    """The model to train or score, loaded from `path` (the demo's random weights when None): with
    LoRA adapters when --lora-rank > 0 and `lora` (fresh, or read from `adapters`), sharded with
    --fsdp, gradient checkpointing as asked; in `dtype` when given."""
    cfg, fsdp = s.cfg, s.ranks.fsdp
    load_to = "cpu" if fsdp else s.device  # FSDP: whole on the CPU, then each rank's shard to its device
    if path is None:
        model = demo_model(s.tok.vocab_size, s.tok.turn_end_id, cfg.seed).to(load_to, s.weights_dtype)
    else:
        lora = lora and cfg.lora_rank > 0
        try:  # with LoRA the base is frozen: keep it in the compute dtype
            model = load_model(path, dtype or (s.compute_dtype if lora else s.weights_dtype), load_to)
            if lora:
                add_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg), seed=cfg.seed)
                if adapters is not None:
                    load_adapters(adapters, model)
        except (CheckpointError, OSError) as e:
            fail(str(e))
    if fsdp:
        model = shard(model, s.compute_dtype, s.ranks.device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    return model


def first_policy(s: Setup):
    """The model the run starts from: the checkpoint resumed, the given one, or the demo's."""
    model = policy(s, s.start, adapters=Path(s.cfg.resume) if s.cfg.resume and s.cfg.lora_rank else None)
    if s.ranks.rank == 0:
        print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {model.config.arch}, weights "
              f"{s.weights_dtype}, compute {s.compute_dtype}, {s.device}"
              + (f", sharded over {s.ranks.world} ranks" if s.ranks.fsdp else ""))
    return model


def score(s: Setup, model, examples, desc: str, fidelity=None, save_to: Path | None = None,
          expected: bool = False) -> RatingMetrics:
    """Greedy decoding on `examples` (report.evaluate), every rank its share; save_to: their predictions;
    expected: also the expected-rating read-out."""
    with s.stop.abandoning(f"the {desc.replace('valid', 'validation')}"):  # a stop request gives it up at once
        return evaluate(model, s.tok, s.prompter, examples, s.task.fallback, s.cfg.max_new_tokens, desc=desc,
                        fidelity=fidelity, scale=s.task.scale, dist=s.ranks, save_to=save_to, expected=expected)


def score_test(s: Setup, model, name: str, desc: str, fidelity=None) -> RatingMetrics:
    """The test split; every example's prediction goes to OUT/predictions/NAME.jsonl (and, with
    --expected-rating, its expected rating to NAME-expected.jsonl)."""
    return score(s, model, s.task.test, desc, fidelity, s.out / "predictions" / f"{name}.jsonl",
                 s.cfg.expected_rating)


def baselines(s: Setup) -> list[tuple[str, RatingMetrics]]:
    """The classic baselines' test rows (fitted on the training split), logged."""
    with s.stop.abandoning("the baselines' test rows"):
        rows = baseline_rows(s.task.baselines, s.task.test, s.fidelity,
                             s.out / "predictions" if s.ranks.rank == 0 else None)
    for name, m in rows:
        s.log({"stage": "baseline", "name": name, **asdict(m)})
    return rows


def evaluate_only(s: Setup, model, rows) -> None:
    """--eval-only: the model's test row beside the baselines, into OUT/eval/."""
    rows.append(("model", score_test(s, model, "model", "test")))
    s.log({"stage": "test", "name": "model", **asdict(rows[-1][1])})
    if s.ranks.rank == 0:
        write_text(s.out / "results.md", results_table(rows) + "\n")
        print(results_table(rows))


def run_around(s: Setup) -> Run:
    """The Run the lesson's loops report to (plumbing/bookkeeping.py), with its callbacks into evaluation and
    checkpoints."""
    cfg, state = s.cfg, s.state

    def validate(model):  # on every rank, each decoding its share; all get the same metrics
        start = state.step == 0  # before the first GRPO step: check the start (plumbing/collapse.py)
        if not s.task.valid:
            if start:
                note(s, "warning: start check: no validation examples, so whether the starting model beats the "
                        "best constant (and GRPO has more than a constant to find) cannot be checked")
            return
        saved = s.out / "predictions" / "valid_start.jsonl" if start else None
        m = score(s, model, s.task.valid, "valid", s.fidelity, saved)
        s.log({"stage": "eval", "step": state.step, **asdict(m)})
        if s.ranks.rank == 0:
            tqdm.write(f"step {state.step}: valid {describe(m)}")
            if start:
                rows = read_predictions(saved)
                check = start_check(s.task.valid, [rows[e.target.key]["rating"] for e in s.task.valid],
                                    s.task.baselines)
                s.log({"stage": "start_check", **asdict(check), "beats_constant": check.beats_constant})
                note(s, start_line(check, m, cfg.mode))
            elif line := collapse_note(state.step, m):  # kept for results.md the first time
                note(s, line, keep=not any(n.startswith(COLLAPSED) for n in state.notes))
        if cfg.select == "best" and (state.best is None or m.mae < state.best.mae):
            save_model(model, s.out / "best", s.tok_dir)  # atomic: a crash keeps the previous best
            state.best = BestSoFar(state.step, m.mae, str(s.out / "best"))

    def save(model, optimizer):  # every rank calls it (a sharded model is gathered); rank 0 writes
        save_checkpoint(s.out / "checkpoint", model, s.tok_dir, optimizer, state, asdict(cfg))

    def restore(optimizer, phase: str):  # AdamW's moments, when --resume continues this loop
        if s.resume_phase == phase:
            load_optimizer(Path(cfg.resume), optimizer)

    return Run(cfg, s.out, s.ranks, s.log, state, s.stop, validate, save, restore)


def note(s: Setup, line: str, keep: bool = True) -> None:
    """Print a warning or check (rank 0), and keep it for results.md (once: a resumed run has it already)."""
    if s.ranks.rank == 0:
        tqdm.write(line, file=sys.stderr)
        if keep and line not in s.state.notes:
            s.state.notes.append(line)


def cold_start_data(s: Setup) -> list[Trace]:
    """RecOne's traces: asked of the teacher by a new run (and kept in OUT/cold_start_traces.jsonl),
    read back by a run resumed in its SFT."""
    if s.state.sft_step is None:
        with s.stop.abandoning("the teacher's traces"):
            traces = cold_start_traces(s.cfg, s.task, s.prompter, s.compute_dtype, s.device, s.log, s.ranks)
        s.state.sft_step, s.state.sft_traces = 0, str(s.out / "cold_start_traces.jsonl")
        if s.ranks.rank == 0:
            save_traces(traces, Path(s.state.sft_traces))
        return traces
    try:
        return load_traces(s.state.sft_traces, s.task.train)
    except (OSError, ValueError) as e:
        fail(f"--resume {s.cfg.resume}: cannot read the cold start's traces: {e}")


def after_cold_start(s: Setup, model):
    """The cold start saved in the Hugging Face layout and reloaded through the loader real checkpoints
    use (with fresh LoRA adapters for GRPO), then scored on the test split: GRPO's starting row."""
    save_model(model, s.out / "cold_start", s.tok_dir)
    s.state.sft_step = None
    s.ranks.barrier()
    model = policy(s, s.out / "cold_start")
    s.state.start_model = str(s.out / "cold_start")
    s.state.start_test = asdict(score_test(s, model, "test_start", "test (cold start)", s.fidelity))
    return model


def before_rl(s: Setup, model) -> None:
    """RecZero (no cold start), a new run: the starting model's test row; the demo's random weights,
    which are on no disk, are saved as the KL reference."""
    if s.cfg.demo:
        save_model(model, s.out / "start", s.tok_dir)
        s.ranks.barrier()
        s.state.start_model = str(s.out / "start")
    s.state.start_test = asdict(score_test(s, model, "test_start", "test (before RL)"))


def reference(s: Setup):
    """The frozen KL reference for --beta > 0 (the starting model: the cold start or --model), else None.
    Never trained, so it is held in the compute dtype (bf16 under fp32 master weights)."""
    if s.cfg.beta == 0:
        return None
    return policy(s, Path(s.state.start_model), lora=False, dtype=s.compute_dtype).requires_grad_(False)


def start_row(s: Setup) -> None:
    """Log the test row of the model GRPO starts from, once."""
    if s.state.step == 0 and s.ranks.rank == 0:
        s.log({"stage": "test_start", "step": 0, **s.state.start_test})


def final_test(s: Setup, model, rows) -> None:
    """The model after GRPO (or its best validated weights, --select best) on the test split; the results
    table with paired intervals against the starting model, MF and bias; the curves."""
    cfg, state = s.cfg, s.state
    label, step = f"LLM after GRPO (step {cfg.steps})", cfg.steps
    if cfg.select == "best" and state.best:  # the weights of the best validation MAE
        step = state.best.step
        s.ranks.barrier()  # rank 0 may still be writing it
        model = policy(s, Path(state.best.path), lora=False)  # as validate saved it
        label = f"LLM after GRPO (best valid MAE: step {step} of {cfg.steps})"
    final = score_test(s, model, "test", "test (GRPO)", s.fidelity)
    s.log({"stage": "test", "step": step, **asdict(final)})
    if s.ranks.rank != 0:
        return
    start = "after cold start" if cfg.mode == "recone" else "before RL"
    start_metrics = RatingMetrics(**state.start_test)
    rows += [(labelled(f"LLM {start}", start_metrics), start_metrics), (labelled(label, final), final)]
    pred = s.out / "predictions"
    against = [(start, "test_start"), ("matrix factorisation", "baseline-mf"), ("user+item bias", "baseline-bias")]
    # a run resumed into another --out finds its cold start's predictions in the first run's folder only
    table = results_table(rows) + f"\n\nOn the same {final.n} test examples:\n\n"
    if final.n >= 2:
        intervals = [(f"after GRPO - {name}", compare(pred / "test.jsonl", pred / f"{stem}.jsonl"))
                     for name, stem in against if (pred / f"{stem}.jsonl").exists()]
        for name, iv in intervals:
            s.log({"stage": "interval", "name": name, **asdict(iv)})
        table += interval_table(intervals)
    else:  # one example resampled is itself: a zero-width "interval" would look like certainty
        table += "too few test examples for an interval (--eval-size 2 or more)"
    if state.notes:  # the start check and any collapse (plumbing/collapse.py)
        table += "\n\nBefore and during GRPO:\n\n" + "\n".join(f"- {line}" for line in state.notes)
    write_text(s.out / "results.md", table + "\n")
    if (s.out / "checkpoint").exists():
        mark_tested(s.out / "checkpoint")  # a --resume with no more steps now has nothing to do
    print(table)
    plot(s.out)
