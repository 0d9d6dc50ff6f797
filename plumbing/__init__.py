"""Everything a run needs that is not the lesson: a reader of GRPO can skip this package.

- cli.py: train.py's flags (RunConfig), their paper and demo defaults, and their checks.
- experiment.py: assembling a run: data and baselines, the demo's tokenizer and model, the teacher's
  traces, the memory plan of the run.
- parallel.py: running as one of N torchrun processes: data parallel, and FSDP (--fsdp).
- memory.py: the memory plan: what a run will hold on its device, before any weight loads.
- checkpoints.py: Hugging Face checkpoint folders in and out (safetensors only), training checkpoints.
- runs.py: one run per output folder (a lock, refusals, --eval-only's and --dry-run's folders) and
  files written whole or not at all (a full disk is one line naming the file).
- tokenizer.py: `tokenizer.json` through `tokenizers`, chat formats, the demo's BPE trainer.
- readers.py: Amazon, MovieLens, Yelp and CSV rating files (docs/data.md).
- synthetic.py: the embedded synthetic dataset of the demo.
- baselines.py: global mean, user+item bias, matrix factorisation.
- teachers.py: RecOne's teachers and the aligned / rationalised trace filter.
- report.py: greedy evaluation, a step's rollout metrics, the results table, metrics.jsonl, curves.
"""
