"""A policy that ignores its prompt: checked before GRPO starts, and watched for while it runs.

Under the paper's reward, 1 - |error| / span, the best a policy can do without reading its prompt is one
rating for everyone: the training split's median (the best constant, baselines.BestConstant). GRPO from a
starting model that does not beat that constant tends to find it, and then every group's rewards are
equal and the gradient is zero: the run looks calm while it has stopped learning (SmolLM2-135M on
MovieLens answered 4 to every test example). So a run

- checks its starting model (the cold start in RecOne, the checkpoint in RecZero) on the validation
  examples before the first GRPO step, against the best constant and the user+item bias, and says in
  one line whether GRPO has something better than the constant to build on (start_check);
- says when the validation predictions fall to one rating (collapse_note), and labels a results row
  whose test predictions have (labelled); plumbing/bookkeeping.FlatWatch says when nearly every group of
  the last steps had equal rewards, with the step and the rating sampled most.

These are warnings, not stops: a constant can be a fair answer on some data, and the user decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

from reczero import COLLAPSE_SHARE, RatingMetrics, collapsed, paired_bootstrap

COLLAPSED = "warning: collapse"  # how collapse_note's line starts


@dataclass
class StartCheck:
    """The starting model against the best constant and the user+item bias on the validation examples."""

    n: int
    mae: float
    constant: float  # the constant rating
    constant_mae: float
    bias_mae: float
    mf_mae: float  # matrix factorisation's, for the record (the line leaves it out)
    diff: float  # MAE(model) - MAE(constant), with its paired bootstrap 95% interval (None for n < 2)
    low: float | None
    high: float | None

    @property
    def beats_constant(self) -> bool:
        return self.mae < self.constant_mae


def start_check(examples, ratings: list[float | None], baselines) -> StartCheck:
    """Compare the model's validation ratings (one per example, None where its output did not parse) with
    the best constant's and the bias baseline's (`baselines`: experiment.TaskData.baselines) on the same
    examples. An unparsable output counts as the constant's answer: the check asks what the model's own
    ratings add to the constant, so a model that never writes one cannot pass on its fallback's merit."""
    truth, constant = [e.label for e in examples], baselines["constant"].mu
    model = [abs((constant if p is None else p) - y) for p, y in zip(ratings, truth)]
    const = [abs(baselines["constant"].predict(e.target.user_id, e.target.item_id) - y) for e, y in zip(examples, truth)]
    bias, mf = ([abs(baselines[name].predict(e.target.user_id, e.target.item_id) - y) for e, y in zip(examples, truth)]
                for name in ("bias", "mf"))
    iv = paired_bootstrap(model, const) if len(examples) >= 2 else None
    return StartCheck(len(examples), fmean(model), baselines["constant"].mu, fmean(const), fmean(bias), fmean(mf),
                      fmean(model) - fmean(const), iv and iv.low, iv and iv.high)


def start_line(c: StartCheck, m: RatingMetrics, mode: str) -> str:
    """The one line a run prints before GRPO: the numbers, and when the model does not beat the constant,
    what GRPO is then likely to do and what to change. m: the model's validation metrics (fidelity)."""
    who = "the cold start" if mode == "recone" else "the starting model"
    interval = f" [{c.low:+.3f}, {c.high:+.3f}]" if c.low is not None else ""
    parsed = "" if m.valid_rate == 1 else f", {m.valid_rate:.0%} of its outputs parsable (the others count as the constant)"
    numbers = (f"{who}'s validation MAE {c.mae:.3f} against {c.constant_mae:.3f} for always answering "
               f"{c.constant:g} (the best constant; difference {c.diff:+.3f}{interval}) and {c.bias_mae:.3f} for "
               f"the user+item bias, on {c.n} examples{parsed}")
    fidelity = ""
    if m.fidelity:
        fidelity = (f"; its traces agree with the heuristic teacher on the user's taste {m.fidelity['taste']:.0%} "
                    f"and the item's reception {m.fidelity['reception']:.0%} of the time")
    if c.beats_constant:
        return f"start check: {numbers}: it reads its prompt better than a constant{fidelity}."
    fix = ("more traces (--cold-start-size), --mark-shared on, a larger model, or a real teacher (--teacher)"
           if mode == "recone" else "a cold start first (--mode recone) or a larger instruct model")
    return (f"warning: start check: {numbers}: it does not beat the constant, so GRPO is likely to settle on "
            f"answering {c.constant:g} everywhere{fidelity}. Give it a start that reads its prompt: {fix}.")


def collapse_note(step: int, m: RatingMetrics) -> str | None:
    """A line when the validation predictions at `step` have (nearly) all fallen to one rating, else None."""
    if m.top_share < COLLAPSE_SHARE:
        return None
    return (f"{COLLAPSED} at step {step}: {m.top_share:.0%} of the validation predictions are {m.top_rating:g} "
            f"(prediction std {m.pred_std:.2f}): the policy has collapsed to one rating and no longer reads its "
            "prompt; lower --lr, or start from a cold start that reads its prompt (see the start check)")


def labelled(name: str, m: RatingMetrics) -> str:
    """A results row's name, saying so when the model has collapsed to one rating."""
    return f"{name} (collapsed: {m.top_share:.0%} of the predictions are {m.top_rating:g})" if collapsed(m) else name
