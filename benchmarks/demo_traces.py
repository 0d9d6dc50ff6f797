"""What GRPO changed in the demo's reasoning: the cold start and the final model, trace by trace.

    python train.py --out runs/demo && python benchmarks/demo_traces.py runs/demo

It reads the greedy test-set outputs the run itself scored (OUT/predictions/test_start.jsonl for the
cold start, test.jsonl after GRPO), so its MAEs are the results table's. For each example it reads
the judgements each trace writes down (taste for the target's category, reception by other users)
and its rating, then prints:

1. how often the two traces agree before the <rate> tag (did RL rewrite the reasoning, or only the
   rating that follows it?), and each model's test MAE;
2. the mean rating each model gives for each (taste, reception) pair its trace writes, beside the mean
   true rating of those examples: the heuristic teacher's rating follows the taste alone, so the cold
   start's does too; if GRPO made the model use what it writes about the item's reception, the rows
   of one taste now differ;
3. a few examples where the rating moved, with both traces.

Only runs with the heuristic teacher (the demo's) are understood.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumbing.report import read_predictions  # noqa: E402
from plumbing.teachers import RECEPTION, TASTE, read_judgement  # noqa: E402
from reczero import rating_metrics  # noqa: E402


def reasoning(text: str) -> str:
    """The trace before its rating."""
    return text.split("<rate>")[0]


def mean(xs) -> str:
    return f"{statistics.fmean(xs):.2f}" if xs else "-"


def read_run(out: Path):
    """A finished demo run's test outputs: (keys, texts by model, truths, judgements by model, step);
    models "cold start" (OUT/predictions/test_start.jsonl) and "GRPO" (test.jsonl)."""
    saved = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    args_, step = saved["args"], saved["step"]
    if args_["mode"] != "recone" or args_["teacher"] != "heuristic" or args_["sft_traces"]:
        sys.exit(f"{out}: not a run with the heuristic teacher's cold start")
    rows = {name: read_predictions(out / "predictions" / f"{stem}.jsonl")
            for name, stem in (("cold start", "test_start"), ("GRPO", "test"))}
    keys = sorted(rows["GRPO"])
    texts = {name: [r[k]["text"] for k in keys] for name, r in rows.items()}
    truths = [rows["GRPO"][k]["label"] for k in keys]
    judged = {name: [read_judgement(t) for t in ts] for name, ts in texts.items()}
    return rows, keys, texts, truths, judged, step


def by_judgement(truths, judged) -> dict:
    """{(taste, reception): {"truth": [...], "cold start": [...], "GRPO": [...]}}: the ratings of the
    examples whose trace after GRPO writes that pair (the reasoning rarely changes), in the words' order."""
    cells = defaultdict(lambda: defaultdict(list))
    for i, truth in enumerate(truths):
        j = judged["GRPO"][i]
        cells[(j.taste, j.reception)]["truth"].append(truth)
        for name in judged:
            if judged[name][i].rating is not None:
                cells[(j.taste, j.reception)][name].append(judged[name][i].rating)
    return {(t, r): cells[(t, r)] for t in TASTE[0] for r in RECEPTION[0] if (t, r) in cells}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the OUT directory of a finished demo run")
    p.add_argument("--examples", type=int, default=4, help="moved ratings to print")
    args = p.parse_args(argv)
    rows, keys, texts, truths, judged, step = read_run(args.out)

    # 1. the reasoning kept, the rating moved?
    n = len(truths)
    same = sum(reasoning(a) == reasoning(b) for a, b in zip(texts["cold start"], texts["GRPO"]))
    moved = [i for i in range(n) if judged["cold start"][i].rating != judged["GRPO"][i].rating]
    print(f"{n} test examples, step {step}: reasoning before <rate> identical in {same} ({same / n:.0%}); "
          f"rating changed in {len(moved)} ({len(moved) / n:.0%})")
    for name, r in rows.items():  # scored as the results table scored them
        m = rating_metrics([r[k]["rating"] for k in keys], truths, [r[k]["scored"] for k in keys])
        print(f"{name}: test MAE {m.mae:.3f}, format valid {m.valid_rate:.0%}, pred std {m.pred_std:.2f}")

    # 2. rating by written judgement (the GRPO model's words: the reasoning rarely changes)
    print("\n| the trace says: taste | reception | n | true rating | cold start | GRPO |")
    print("|---|---|---|---|---|---|")
    for (taste, rec), c in by_judgement(truths, judged).items():
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
