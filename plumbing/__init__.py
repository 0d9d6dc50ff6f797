"""Everything a run needs that is not the lesson: a reader of GRPO can skip this package.

- stages.py: the stages train.main() runs (build the run, baselines, cold start, GRPO's surroundings,
  final test), the one way a model is loaded (LoRA, FSDP, gradient checkpointing), and session():
  folder, signals, autocast, torchrun, one line for an error a user can fix.
- bookkeeping.py: what a run does around the lesson's loops (Run: log, validate, save, stop,
  divergence and no-signal checks after each step), metrics.jsonl (RunLog), signals (GracefulStop).
- runs.py: one run per output folder (a lock, refusals, --eval-only's and --dry-run's folders) and
  files written whole or not at all (a full disk is one line naming the file).
- cli.py: train.py's flags (RunConfig), their paper and demo defaults, and their checks.
- experiment.py: assembling a run: data and baselines, the demo's tokenizer and model, the teacher's
  traces, the memory plan of the run.
- parallel.py: running as one of N torchrun processes: data parallel, and FSDP (--fsdp); Distributed
  answers what the lesson asks of the other ranks.
- memory.py: the memory plan: what a run will hold on its device, before any weight loads.
- checkpoints.py: Hugging Face checkpoint folders in and out (safetensors only), training checkpoints.
- tokenizer.py: the demo's BPE trainer (the tokenizer itself is model.Tokenizer).
- readers.py: Amazon, MovieLens, Yelp and CSV rating files (docs/data.md).
- synthetic.py: the embedded synthetic dataset of the demo.
- baselines.py: global mean, user+item bias, matrix factorisation.
- teachers.py: RecOne's teachers and the aligned / rationalised trace filter.
- report.py: greedy evaluation, per-example predictions and paired intervals, the results table, curves.
"""
