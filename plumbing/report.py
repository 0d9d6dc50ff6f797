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
from model import SamplingConfig, generate, right_pad
from plumbing.parallel import Distributed, gathered
from plumbing.runs import written_file
from reczero import (
    RATE_OPEN,
    Interval,
    RatingMetrics,
    expected_rating,
    paired_bootstrap,
    parse_output,
    rating_metrics,
)

EVAL_BATCH = 64  # examples decoded at once by evaluate (the memory plan counts their KV cache)


@torch.no_grad()
def evaluate(model, tok, prompter, examples, fallback: dict, max_new_tokens: int, batch: int = EVAL_BATCH, desc="eval",
             fidelity=None, scale: tuple[float, float] = RATING_SCALE,
             dist: Distributed | None = None, save_to: Path | None = None, expected: bool = False) -> RatingMetrics:
    """Greedy decoding on `examples`; returns RatingMetrics. An unparsable output is scored with
    fallback[example.target.key] (train.py passes the bias baseline's prediction). `fidelity`
    (a teachers.TraceFidelity) also compares each trace with the heuristic teacher's. `save_to`: a
    JSONL file that gets every example's prediction and text (write_predictions). `expected`: also read
    each valid output's rating as the expected rating at its position (expected_ratings), into
    metrics.expected and save_to's NAME-expected.jsonl.
    Under torchrun every rank calls it, decodes every dist.world-th example and gets the same metrics."""
    dist = dist or Distributed()
    model.eval()
    mine = list(range(dist.rank, len(examples), dist.world))
    texts, readouts = {}, {}
    with gathered(model):  # a sharded model: whole for a while, so ranks may decode different lengths
        for i in tqdm(range(0, len(mine), batch), desc=desc, leave=False, disable=dist.rank != 0):
            rows = mine[i:i + batch]
            prompts = [prompter(examples[j]) for j in rows]
            gen = generate(model, prompts, SamplingConfig(max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids),
                           pad_id=tok.pad_id)
            texts.update(zip(rows, [tok.decode(c) for c in gen.completions()]))
            if expected:
                readouts.update(zip(rows, expected_ratings(model, tok, prompts, gen.completions(), scale)))
    texts = dict(dist.gather_objects(list(texts.items())))
    texts = [texts[j] for j in range(len(examples))]
    fallbacks = [fallback[e.target.key] for e in examples]
    preds = [parse_output(t, scale).rating for t in texts]
    metrics = rating_metrics(preds, [e.label for e in examples], fallbacks)
    if fidelity is not None:
        metrics.fidelity = asdict(fidelity(examples, texts))
    if save_to is not None and dist.rank == 0:
        write_predictions(save_to, examples, preds, fallbacks, texts)
    if expected:  # only where the output parses, as the written rating: the same examples fall back
        readouts = dict(dist.gather_objects(list(readouts.items())))
        read = [readouts[j] if p is not None else None for j, p in enumerate(preds)]
        metrics.expected = asdict(rating_metrics(read, [e.label for e in examples], fallbacks))
        if save_to is not None and dist.rank == 0:
            write_predictions(save_to.with_name(save_to.stem + "-expected.jsonl"), examples, read, fallbacks)
    return metrics


# -----------------------------------------------------------------------------
# The expected rating: the model's probabilities of the rating tokens where it writes its rating


def rating_tokens(tok, scale: tuple[float, float] = RATING_SCALE) -> tuple[list[float], dict[str, list[int]]]:
    """The integer ratings of `scale` and, for each way the tokenizer writes one as a single token ("4", and
    " 4" where a space merges with the digit), their token ids. A ValueError when the scale has ratings that
    are not integers or an integer rating is not one token: such a read-out would be read wrong."""
    lo, hi = scale
    if lo != int(lo) or hi != int(hi):
        raise ValueError(f"--expected-rating reads the integer ratings 1 token each; the {lo:g}-{hi:g} scale "
                         "has half stars")
    values = [float(v) for v in range(int(lo), int(hi) + 1)]
    ids = {ws: [tok.encode(ws + f"{v:g}") for v in values] for ws in ("", " ")}
    ids = {ws: [i[0] for i in found] for ws, found in ids.items() if all(len(i) == 1 for i in found)}
    if "" not in ids:
        raise ValueError(f"--expected-rating: this tokenizer does not write every rating {lo:g}-{hi:g} as one "
                         "token, so their probabilities cannot be read at one position")
    return values, ids


def rating_position(tok, completion: list[int]) -> tuple[int, str] | None:
    """(j, ws): completion token j is where the rating after <rate> starts, and ws the whitespace that token
    carries before the digit; None when the first token with text after <rate> is not a rating token."""
    pieces = [tok.decode([t]) for t in completion]
    end = "".join(pieces).find(RATE_OPEN)
    if end < 0:
        return None
    end, pos = end + len(RATE_OPEN), 0
    for j, piece in enumerate(pieces):
        if pos >= end and piece.strip():
            digit = piece.lstrip()
            return (j, piece[:len(piece) - len(digit)]) if digit.isdigit() and digit.isascii() else None
        pos += len(piece)
    return None


@torch.no_grad()
def expected_ratings(model, tok, prompts: list[list[int]], completions: list[list[int]],
                     scale: tuple[float, float] = RATING_SCALE, batch: int = 16) -> list[float | None]:
    """Each completion's expected rating (reczero.expected_rating) at the position where it writes its
    rating: one teacher-forced pass over prompt + completion up to there. None where it writes none."""
    values, ids = rating_tokens(tok, scale)
    found = []  # (completion, its rating's position, the token ids of the ratings written that way)
    for k, c in enumerate(completions):
        at = rating_position(tok, c)
        if at is not None and at[1] in ids:
            found.append((k, at[0], ids[at[1]]))
    out: list[float | None] = [None] * len(completions)
    device = model.embed_tokens.weight.device
    for i in range(0, len(found), batch):
        part = found[i:i + batch]
        seq, lens = right_pad([prompts[k] + completions[k][:j] for k, j, _ in part], tok.pad_id, device)
        h = model(seq)[torch.arange(len(part), device=device), lens - 1]  # (b, C): predicts the rating token
        cand = torch.tensor([c for _, _, c in part], device=device)  # (b, K)
        rating_logits = model.logits(h).float().gather(1, cand)
        for (k, _, _), r in zip(part, expected_rating(rating_logits, values).tolist()):
            out[k] = r
    return out


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
    with_expected = []  # a row read out as the expected rating (--expected-rating) is shown below its own
    for name, m in rows:
        with_expected.append((name, m))
        if m.expected:
            with_expected.append((f"{name}, expected rating", RatingMetrics(**m.expected)))
    for name, m in with_expected:
        if m.valid_rate < MOSTLY_PARSABLE:  # its MAE is mostly the fallback's: say so, never show it as a gain
            name += (f" (mostly unparsable: {m.valid_rate:.0%} format valid, so the MAE is mostly the bias "
                     "baseline's fallback, not this model's)")
        row = (f"| {name} | {m.mae:.3f} | {m.rmse:.3f} | {m.valid_rate:.0%} | {m.mae_valid:.3f} | "
               f"{m.pred_std:.2f} ({m.true_std:.2f}) | {m.distinct} |")
        if with_fidelity:
            row += "".join(f" {m.fidelity[k]:.0%} |" if m.fidelity else " - |" for k in FIDELITY_FIELDS)
        out.append(row)
    return "\n".join(out)


# the classic baselines (plumbing/baselines.py) and the two means every prompt shows, by file name; the
# best constant's label names its rating
BASELINES = {"global_mean": "global mean", "constant": "best constant (the training median, {constant:g})",
             "user_mean": "user mean (the prompt's user_avg_rating)",
             "item_mean": "item mean (the prompt's target_item_avg_rating)", "bias": "user+item bias",
             "mf": "matrix factorisation"}


def baseline_rows(baselines: dict, test, fidelity=None, save_dir: Path | None = None) -> list[tuple[str, RatingMetrics]]:
    """(name, RatingMetrics) of the classic baselines on the test examples, of the user's and the item's
    earlier mean ratings (exactly the averages the prompt shows), and of the heuristic teacher's own
    ratings when `fidelity` (a teachers.TraceFidelity) is given. `save_dir`: each row's predictions
    go to save_dir/baseline-NAME.jsonl (write_predictions)."""
    targets = [e.target for e in test]
    preds = {"global_mean": baselines["global_mean"].predict_many(targets).tolist(),
             "constant": baselines["constant"].predict_many(targets).tolist(),
             "user_mean": [e.user_avg for e in test], "item_mean": [e.item_avg for e in test],
             "bias": baselines["bias"].predict_many(targets).tolist(),
             "mf": baselines["mf"].predict_many(targets).tolist()}
    if fidelity is not None:
        preds["teacher"] = [fidelity.teacher.judge(e).rating for e in test]
    rows = []
    for name, pred in preds.items():
        label = BASELINES.get(name, "heuristic teacher").format(constant=baselines["constant"].mu)
        rows.append((label, rating_metrics(pred, [e.label for e in test], pred)))
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
