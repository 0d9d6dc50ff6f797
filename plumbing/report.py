"""Evaluation and reporting: greedy scoring of a model, its per-example predictions and paired intervals,
the results table and the run's curves.

Evaluation decodes greedily (the paper's setting) and scores an unparsable output with a fallback
prediction rather than dropping it or, as the released code did, counting it as perfect.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from data import RATING_SCALE
from model import SamplingConfig, generate
from plumbing.parallel import Distributed, gathered
from plumbing.runs import written_file
from reczero import (
    Interval,
    RatingMetrics,
    paired_bootstrap,
    parse_output,
    rating_metrics,
)

EVAL_BATCH = 64  # examples decoded at once by evaluate (the memory plan counts their KV cache)


@torch.no_grad()
def evaluate(model, tok, prompter, examples, fallback: dict, max_new_tokens: int, batch: int = EVAL_BATCH, desc="eval",
             fidelity=None, scale: tuple[float, float] = RATING_SCALE,
             dist: Distributed | None = None, save_to: Path | None = None) -> RatingMetrics:
    """Greedy decoding on `examples`; returns RatingMetrics. An unparsable output is scored with
    fallback[example.target.key] (train.py passes the bias baseline's prediction). `fidelity`
    (a teachers.TraceFidelity) also compares each trace with the heuristic teacher's. `save_to`: a
    JSONL file that gets every example's prediction and text (write_predictions).
    Under torchrun every rank calls it, decodes every dist.world-th example and gets the same metrics."""
    dist = dist or Distributed()
    model.eval()
    mine = list(range(dist.rank, len(examples), dist.world))
    texts = {}
    with gathered(model):  # a sharded model: whole for a while, so ranks may decode different lengths
        for i in tqdm(range(0, len(mine), batch), desc=desc, leave=False, disable=dist.rank != 0):
            rows = mine[i:i + batch]
            gen = generate(model, [prompter(examples[j]) for j in rows],
                           SamplingConfig(max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids), pad_id=tok.pad_id)
            texts.update(zip(rows, [tok.decode(c) for c in gen.completions()]))
    texts = dict(dist.gather_objects(list(texts.items())))
    texts = [texts[j] for j in range(len(examples))]
    fallbacks = [fallback[e.target.key] for e in examples]
    preds = [parse_output(t, scale).rating for t in texts]
    metrics = rating_metrics(preds, [e.label for e in examples], fallbacks)
    if fidelity is not None:
        metrics.fidelity = asdict(fidelity(examples, texts))
    if save_to is not None and dist.rank == 0:
        write_predictions(save_to, examples, preds, fallbacks, texts)
    return metrics


# -----------------------------------------------------------------------------
# Per-example predictions, and paired comparisons of two methods on the same examples


def write_predictions(path: Path, examples, preds: list[float | None], fallbacks: list[float],
                      texts: list[str] | None = None) -> None:
    """One JSON line per example, {user_id, item_id, time, label, rating, scored[, text]}: rating is
    what the output parsed to (null when unparsable), scored what the metrics used (rating, else the
    fallback). Written whole or not at all (runs.written_file), so a reader never sees half a file."""
    with written_file(path) as f:
        for k, (e, p, fb) in enumerate(zip(examples, preds, fallbacks)):
            ok = p is not None and math.isfinite(p)
            row = {"user_id": e.target.user_id, "item_id": e.target.item_id, "time": e.target.time,
                   "label": e.label, "rating": p if ok else None, "scored": p if ok else fb}
            if texts is not None:
                row["text"] = texts[k]
            f.write(json.dumps(row) + "\n")


def read_predictions(path) -> dict[tuple, dict]:
    """write_predictions' lines by Rating.key (user_id, item_id, time)."""
    rows = {}
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        try:
            row = json.loads(line)
            rows[(row["user_id"], row["item_id"], row["time"])] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: not a prediction line ({e})") from None
    return rows


def compare(a_path, b_path, resamples: int = 10_000, seed: int = 0) -> Interval:
    """MAE(a) - MAE(b) on the examples both files score, with its paired bootstrap 95% interval
    (reczero.paired_bootstrap). The two files must score the same examples."""
    a, b = read_predictions(a_path), read_predictions(b_path)
    if a.keys() != b.keys():
        raise ValueError(f"{a_path} and {b_path} score different examples ({len(a)} and {len(b)}): "
                         "a paired comparison needs the same ones")
    keys = sorted(a)
    errors = [[abs(rows[k]["scored"] - rows[k]["label"]) for k in keys] for rows in (a, b)]
    return paired_bootstrap(*errors, resamples=resamples, seed=seed)


def interval_table(rows: list[tuple[str, Interval]]) -> str:
    """A markdown table of paired comparisons: the MAE difference and its 95% interval."""
    out = ["| comparison (same test examples) | MAE difference | 95% interval (paired bootstrap) | excludes 0 |",
           "|---|---|---|---|"]
    for name, iv in rows:
        out.append(f"| {name} | {iv.diff:+.3f} | [{iv.low:+.3f}, {iv.high:+.3f}] | "
                   f"{'yes' if iv.excludes_zero() else 'no'} |")
    return "\n".join(out)


def describe(m: RatingMetrics) -> str:
    """One line: MAE, RMSE, format-valid share, spread, distinct ratings, and fidelity when known."""
    line = (f"MAE {m.mae:.3f} RMSE {m.rmse:.3f} format {m.valid_rate:.0%} pred std {m.pred_std:.2f} "
            f"distinct {m.distinct}")
    if m.fidelity:
        f = m.fidelity
        line += (f" | agrees with the teacher: category {f['category']:.0%} taste {f['taste']:.0%} "
                 f"reception {f['reception']:.0%} rating {f['rating']:.0%}; consistent {f['consistent']:.0%}")
    return line


FIDELITY_FIELDS = ("category", "taste", "reception", "rating", "consistent")


MOSTLY_PARSABLE = 0.5  # a row whose outputs parse less often than this is labelled in words


def results_table(rows: list[tuple[str, RatingMetrics]]) -> str:
    """A markdown table of RatingMetrics; with fidelity columns when any row has them."""
    with_fidelity = any(m.fidelity for _, m in rows)
    head = "| method | MAE | RMSE | format valid | MAE (valid only) | pred std (true) | distinct |"
    out = [head + (" agrees: category | taste | reception | rating | consistent |" if with_fidelity else ""),
           "|---" * (7 + 5 * with_fidelity) + "|"]
    for name, m in rows:
        if m.valid_rate < MOSTLY_PARSABLE:  # its MAE is mostly the fallback's: say so, never show it as a gain
            name += (f" (mostly unparsable: {m.valid_rate:.0%} format valid, so the MAE is mostly the bias "
                     "baseline's fallback, not this model's)")
        row = (f"| {name} | {m.mae:.3f} | {m.rmse:.3f} | {m.valid_rate:.0%} | {m.mae_valid:.3f} | "
               f"{m.pred_std:.2f} ({m.true_std:.2f}) | {m.distinct} |")
        if with_fidelity:
            row += "".join(f" {m.fidelity[k]:.0%} |" if m.fidelity else " - |" for k in FIDELITY_FIELDS)
        out.append(row)
    return "\n".join(out)


# the classic baselines (plumbing/baselines.py) and the two means every prompt shows, by file name
BASELINES = {"global_mean": "global mean", "user_mean": "user mean (the prompt's user_avg_rating)",
             "item_mean": "item mean (the prompt's target_item_avg_rating)", "bias": "user+item bias",
             "mf": "matrix factorisation"}


def baseline_rows(baselines: dict, test, fidelity=None, save_dir: Path | None = None) -> list[tuple[str, RatingMetrics]]:
    """(name, RatingMetrics) of the classic baselines on the test examples, of the user's and the item's
    earlier mean ratings (exactly the averages the prompt shows), and of the heuristic teacher's own
    ratings when `fidelity` (a teachers.TraceFidelity) is given. `save_dir`: each row's predictions
    go to save_dir/baseline-NAME.jsonl (write_predictions)."""
    targets = [e.target for e in test]
    preds = {"global_mean": baselines["global_mean"].predict_many(targets).tolist(),
             "user_mean": [e.user_avg for e in test], "item_mean": [e.item_avg for e in test],
             "bias": baselines["bias"].predict_many(targets).tolist(),
             "mf": baselines["mf"].predict_many(targets).tolist()}
    if fidelity is not None:
        preds["teacher"] = [fidelity.teacher.judge(e).rating for e in test]
    rows = []
    for name, pred in preds.items():
        rows.append((BASELINES.get(name, "heuristic teacher"), rating_metrics(pred, [e.label for e in test], pred)))
        if save_dir is not None:
            write_predictions(save_dir / f"baseline-{name}.jsonl", test, pred, pred)
    return rows


def plot(out: Path):
    """reward and validation MAE against steps, from metrics.jsonl, into curves.png (if matplotlib exists)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping curves.png (pip install matplotlib)")
        return
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in recs if r.get("stage") == "grpo"]
    evals = [r for r in recs if r.get("stage") == "eval"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    ax[0].plot([r["step"] for r in train], [r["reward_mean"] for r in train])
    ax[0].set(title="mean reward", xlabel="GRPO step")
    ax[1].plot([r["step"] for r in evals], [r["mae"] for r in evals], marker="o")
    ax[1].set(title="validation MAE (greedy)", xlabel="GRPO step")
    ax[2].plot([r["step"] for r in evals], [r["pred_std"] for r in evals], marker="o", label="pred std")
    ax[2].plot([r["step"] for r in train], [r["frac_reward_zero_std"] for r in train], label="zero-std groups")
    ax[2].set(title="spread and zero-std share", xlabel="GRPO step")
    ax[2].legend()
    fig.tight_layout()
    with written_file(out / "curves.png", "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
