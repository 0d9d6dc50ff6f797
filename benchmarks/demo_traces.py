"""What GRPO changed in the demo's reasoning: the cold start and the final model, trace by trace.

    python train.py --out runs/demo && python benchmarks/demo_traces.py runs/demo

Both models (OUT/cold_start and OUT/checkpoint) decode the run's test set greedily, as the results
table does. For each example the script reads the judgements each trace writes down (taste for the
target's category, reception by other users) and its rating, then prints:

1. how often the two traces agree before the <rate> tag (did RL rewrite the reasoning, or only the
   rating that follows it?), and each model's test MAE;
2. the mean rating each model gives for each (taste, reception) pair its trace writes, beside the mean
   true rating of those examples: the heuristic teacher's rating follows the taste alone, so the cold
   start's does too; if GRPO made the model use what it writes about the item's reception, the rows
   of one taste now differ;
3. a few examples where the rating moved, with both traces.

The run's flags come from OUT/checkpoint/trainer_state.json, so the task (synthetic world, splits,
test subset) is rebuilt exactly. Only runs with the heuristic teacher (the demo's) are understood.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import SamplingConfig, generate  # noqa: E402
from plumbing.checkpoints import load_model  # noqa: E402
from plumbing.cli import RunConfig, prompt_settings  # noqa: E402
from plumbing.experiment import load_task  # noqa: E402
from plumbing.teachers import RECEPTION, TASTE, read_judgement  # noqa: E402
from plumbing.tokenizer import Tokenizer  # noqa: E402
from reczero import Prompter, rating_metrics  # noqa: E402


def decode(model, tok, prompter, examples, max_new_tokens: int, batch: int = 64) -> list[str]:
    """Greedy completions, one string per example (the evaluation's decoding)."""
    texts = []
    for i in range(0, len(examples), batch):
        gen = generate(model, [prompter(e) for e in examples[i:i + batch]],
                       SamplingConfig(max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids), pad_id=tok.pad_id)
        texts += [tok.decode(c) for c in gen.completions()]
    return texts


def reasoning(text: str) -> str:
    """The trace before its rating."""
    return text.split("<rate>")[0]


def mean(xs) -> str:
    return f"{statistics.fmean(xs):.2f}" if xs else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the OUT directory of a finished demo run")
    p.add_argument("--examples", type=int, default=4, help="moved ratings to print")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    saved = json.loads((args.out / "checkpoint" / "trainer_state.json").read_text())
    cfg, step = RunConfig(**saved["args"]), saved["step"]
    if cfg.mode != "recone" or cfg.teacher != "heuristic" or cfg.sft_traces:
        sys.exit(f"{args.out}: not a run with the heuristic teacher's cold start")
    task = load_task(cfg)
    tok = Tokenizer(args.out / "checkpoint")
    prompter = Prompter(tok, *prompt_settings(cfg))
    texts = {}
    for name, path in (("cold start", args.out / "cold_start"), ("GRPO", args.out / "checkpoint")):
        texts[name] = decode(load_model(path), tok, prompter, task.test, cfg.max_new_tokens)
    truths = [e.label for e in task.test]
    judged = {name: [read_judgement(t) for t in ts] for name, ts in texts.items()}

    # 1. the reasoning kept, the rating moved?
    n = len(truths)
    same = sum(reasoning(a) == reasoning(b) for a, b in zip(texts["cold start"], texts["GRPO"]))
    moved = [i for i in range(n) if judged["cold start"][i].rating != judged["GRPO"][i].rating]
    print(f"{n} test examples, step {step}: reasoning before <rate> identical in {same} ({same / n:.0%}); "
          f"rating changed in {len(moved)} ({len(moved) / n:.0%})")
    fallbacks = [task.fallback[e.target.key] for e in task.test]
    for name, js in judged.items():  # scored as the results table scores them: the same task, rebuilt
        m = rating_metrics([j.rating for j in js], truths, fallbacks)
        print(f"{name}: test MAE {m.mae:.3f}, format valid {m.valid_rate:.0%}, pred std {m.pred_std:.2f}")

    # 2. rating by written judgement (the GRPO model's words: the reasoning rarely changes)
    cells = defaultdict(lambda: defaultdict(list))
    for i in range(n):
        j = judged["GRPO"][i]
        key = (j.taste, j.reception)
        cells[key]["truth"].append(truths[i])
        for name in judged:
            if judged[name][i].rating is not None:
                cells[key][name].append(judged[name][i].rating)
    print("\n| the trace says: taste | reception | n | true rating | cold start | GRPO |")
    print("|---|---|---|---|---|---|")
    for taste in TASTE[0]:
        for rec in RECEPTION[0]:
            c = cells.get((taste, rec))
            if c:
                print(f"| {taste} | {rec} | {len(c['truth'])} | {mean(c['truth'])} | {mean(c['cold start'])} "
                      f"| {mean(c['GRPO'])} |")

    # 3. examples
    shown = {}  # one example per kind of move
    for i in moved:
        j = judged["GRPO"][i]
        shown.setdefault((j.taste, j.reception, judged["cold start"][i].rating, j.rating), i)
    for i in list(shown.values())[:args.examples]:
        print(f"\n--- truth {truths[i]:g}: cold start {judged['cold start'][i].rating}, GRPO {judged['GRPO'][i].rating}")
        print(texts["GRPO"][i].strip())


if __name__ == "__main__":
    main()
