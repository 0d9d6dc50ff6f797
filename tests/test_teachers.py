"""Tests for plumbing/synthetic.py, plumbing/teachers.py and train.sft: the synthetic data carries signal
in the histories, the teacher writes valid traces, the RecOne filter keeps only traces that end at the
truth, and SFT learns them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import Example, Item, Rating, build_examples, split_by_time
from model import ModelConfig, Transformer
from plumbing.baselines import fit_baselines
from plumbing.bookkeeping import Run
from plumbing.synthetic import SyntheticConfig, make_synthetic
from plumbing.teachers import (
    HeuristicTeacher,
    Judgement,
    ModelTeacher,
    TraceFidelity,
    build_cold_start,
    history_evidence,
    quotes_hint,
    read_judgement,
)
from plumbing.tokenizer import train_bpe
from reczero import Prompter, parse_output
from train import SFTConfig, sft, sft_loss, sft_row


@pytest.fixture(scope="module")
def world():
    """A small synthetic dataset, its user-last split and test examples."""
    data = make_synthetic(SyntheticConfig(n_users=400, seed=3))
    split = split_by_time(data)
    return data, split, build_examples(data, split.test)


def mae(pred, examples):
    return float(np.mean(np.abs(np.asarray(pred) - [e.label for e in examples])))


def test_synthetic_is_deterministic_and_in_scale():
    """The same seed gives the same ratings; another seed gives others; every rating is an integer 1-5."""
    a, b = make_synthetic(SyntheticConfig(n_users=50, seed=1)), make_synthetic(SyntheticConfig(n_users=50, seed=1))
    c = make_synthetic(SyntheticConfig(n_users=50, seed=2))
    assert a.ratings == b.ratings and a.items == b.items
    assert a.ratings != c.ratings
    assert {r.rating for r in a.ratings} <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert all(r.review for r in a.ratings) and all(i.price is not None for i in a.items.values())


def test_baselines_beat_global_mean_on_synthetic(world):
    """Matrix factorisation and the bias baseline beat the global mean on test MAE."""
    _, split, test = world
    models = fit_baselines(split.train)
    scores = {k: mae(m.predict_many([e.target for e in test]), test) for k, m in models.items()}
    assert scores["bias"] < scores["global_mean"] - 0.05
    assert scores["mf"] < scores["global_mean"] - 0.05


def test_history_reader_beats_bias_baseline(world):
    """The signal is in the histories: the user's same-genre mean, shifted by the item's, clearly beats biases."""
    _, split, test = world
    bias = mae(fit_baselines(split.train)["bias"].predict_many([e.target for e in test]), test)
    rule = []
    for e in test:
        ev = history_evidence(e)
        base = ev.similar_mean if ev.similar_mean is not None else e.user_avg
        rule.append(np.clip(base + e.item_avg - 3.1, 1, 5))
    assert mae(rule, test) < bias - 0.15


def test_teacher_traces_pass_the_format_check(world):
    """Every heuristic-teacher trace parses as valid, with the teacher's own rating in <rate>."""
    _, _, test = world
    teacher = HeuristicTeacher()
    for ex, text in zip(test, teacher.write(test)):
        parsed = parse_output(text)
        assert parsed.valid, (parsed.reason, text)
        assert parsed.rating == teacher.own_rating(history_evidence(ex))
        assert "[pos]" in text and "[neg]" in text


def test_cold_start_keeps_only_traces_ending_at_truth(world):
    """Aligned + rationalised + dropped = asked; every kept trace ends at the truth; some are rationalised."""
    _, _, test = world
    traces, stats = build_cold_start(HeuristicTeacher(seed=0), test)
    assert stats.aligned + stats.rationalised + stats.dropped == stats.asked == len(test)
    assert len(traces) == stats.aligned + stats.rationalised
    assert stats.rationalised > 0 and stats.dropped > 0  # the teacher is imperfect on purpose
    assert all(parse_output(t.text).rating == t.example.label for t in traces)


def test_rationalised_traces_that_cite_the_hint_are_dropped(world):
    """A teacher told the truth may write "the actual rating was 4": the student never sees that hint
    in its prompt, so such a trace is dropped (and counted); one that ends at the truth silently is kept."""
    _, _, test = world

    class Citing:  # wrong at first; when told the truth, every other trace cites it
        def write(self, examples, hints=None):
            if hints is None:
                return ["no rating" for _ in examples]
            return [f"<analyze user>u</analyze user><analyze item>i</analyze item><match>"
                    f"{'given the actual rating, a fit' if k % 2 else 'a fit'}</match><rate>{h:g}</rate>"
                    for k, h in enumerate(hints)]

    traces, stats = build_cold_start(Citing(), test[:10])
    assert (stats.aligned, stats.rationalised, stats.dropped, stats.quoted_hint) == (0, 5, 5, 5)
    assert not any(quotes_hint(t.text) for t in traces)
    assert quotes_hint("The TRUE rating is 3") and quotes_hint("Reasoning towards 4") and not quotes_hint("rated 4")


def test_cold_start_asks_a_seeded_random_sample_of_training_examples():
    """--cold-start-size N < the training examples: N drawn at random over the whole (time-sorted) list,
    not its oldest N; the same seed asks the same examples."""
    from plumbing.cli import parse_args
    from plumbing.experiment import cold_start_traces, load_task

    cfg = parse_args(["--synthetic-users", "150", "--cold-start-size", "30", "--rationalise-rate", "0"])
    task = load_task(cfg)
    position = {id(e): k for k, e in enumerate(task.train)}
    asked = [position[id(t.example)] for t in cold_start_traces(cfg, task, None, None, "cpu", lambda r: None)]
    assert asked and max(asked) > 3 * 30  # reaches far past the oldest 30
    again = [position[id(t.example)] for t in cold_start_traces(cfg, task, None, None, "cpu", lambda r: None)]
    assert asked == again


def test_model_teacher_and_sft_run_on_a_tiny_model(world, tmp_path):
    """Any model can be a teacher through the sampler, and SFT lowers the loss on the traces."""
    _, _, test = world
    traces, _ = build_cold_start(HeuristicTeacher(), test[:40])
    tok = train_bpe([t.text for t in traces] * 3, tmp_path / "tok", vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                                    num_heads=2, num_kv_heads=1, head_dim=16))
    prompter = Prompter(tok)
    texts = ModelTeacher(model, prompter, max_new_tokens=8).write(test[:3], [None, 4.0, None])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    losses = []
    sft(model, prompter, traces[:16], SFTConfig(sft_epochs=3, sft_lr=3e-3, sft_batch=8),
        Run.alone(log=losses.append))
    assert losses[-1]["loss"] < losses[0]["loss"]

    # micro-batches of 3 rows give the gradient of the whole batch of 8: the loss is a mean over the
    # batch's tokens, not over each micro-batch's (SFT's --micro-batch)
    rows = [sft_row(prompter, t) for t in traces[:8]]
    n_trace, n_prompt = sum(len(c) for _, c in rows), sum(len(p) - 1 for p, _ in rows)
    grads = []
    for micro in (8, 3):
        model.zero_grad(set_to_none=True)
        total = sum(sft_loss(model, rows[k:k + micro], n_trace, n_prompt, 0.5, tok.pad_id, "cpu")
                    for k in range(0, 8, micro))
        grads.append((total, [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for g8, g3 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g8, g3, atol=1e-6, rtol=1e-5)

    # inside one autocast region (train.py's, fp32 weights and bf16 compute) each SFT step sees the
    # weights the last one left, as with autocast's cache of low-precision copies turned off
    trained = []
    for cache in (True, False):
        torch.manual_seed(0)
        student = Transformer(model.config)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            sft(student, prompter, traces[:16], SFTConfig(sft_epochs=2, sft_lr=3e-3, sft_batch=8), Run.alone())
        trained.append(student.state_dict())
    for name in trained[0]:
        assert torch.equal(trained[0][name], trained[1][name]), name


# -----------------------------------------------------------------------------
# reasoning fidelity


def hand_example(genre: str, ratings: list[float], item_avg: float, label: float, other_genre="Horror") -> Example:
    """A user who rated items of `genre` with `ratings` (plus one item of another genre, rated 1)."""
    hist = [(Rating("u", f"h{k}", r, k), Item(f"h{k}", categories=(genre,))) for k, r in enumerate(ratings)]
    hist.append((Rating("u", "o", 1.0, 50), Item("o", categories=(other_genre,))))
    target = Rating("u", "t", label, 100)
    return Example(target, Item("t", categories=(genre,)), hist, [Rating("v", "t", item_avg, 60)],
                   user_avg=float(np.mean([r for r in ratings] + [1.0])), item_avg=item_avg)


def trace(category: str, taste: str, reception: str, rating: str) -> str:
    """A trace in the heuristic teacher's format, written by hand."""
    return (f"<analyze user>\nThe user {taste} {category}; a moderate rater.\n</analyze user>\n"
            f"<analyze item>\nA {category} item, {reception} by others. [pos] none [neg] none\n</analyze item>\n"
            f"<match>\nThe user {taste} {category}; the item is {reception}.\n</match>\n<rate>\n{rating}\n</rate>")


def test_judgement_of_hand_written_examples():
    """The teacher's words follow its cuts: same-genre mean 4.5 -> loves, item average 3.9 -> acclaimed;
    no same-genre history -> judged from the user average; its rating is the taste's."""
    teacher = HeuristicTeacher()
    assert teacher.judge(hand_example("Drama", [4, 5], 3.9, 5)) == Judgement("Drama", "loves", "acclaimed", 5.0)
    assert teacher.judge(hand_example("Drama", [3, 4], 3.0, 4)) == Judgement("Drama", "likes", "mixed", 4.0)
    lone = hand_example("Drama", [], 2.0, 1, other_genre="Comedy")  # only a Comedy rated 1: average 1.0
    assert teacher.judge(lone) == Judgement("Drama", "hates", "panned", 1.0)


def test_read_judgement_reads_the_teachers_own_traces(world):
    """read_judgement(teacher's trace) == teacher.judge(example) for real examples (no rationalisation)."""
    _, _, test = world
    teacher = HeuristicTeacher()
    for ex, text in zip(test[:50], teacher.write(test[:50])):
        assert read_judgement(text) == teacher.judge(ex)
    assert read_judgement("<rate>4</rate> no reasoning") == Judgement(None, None, None, None)
    multi = read_judgement(trace("CDs & Vinyl", "is lukewarm on", "weak", "2.5").replace(
        "; a moderate", " (no earlier CDs & Vinyl: judged from their average); a moderate"))
    assert multi == Judgement("CDs & Vinyl", "is lukewarm on", "weak", 2.5)


def test_fidelity_shares_by_hand():
    """Four traces with known agreement: the shares are counted field by field, and `consistent` asks
    whether the rating equals the implied rating of the trace's own taste and reception."""
    examples = [hand_example("Drama", [4, 5], 3.9, 5), hand_example("Drama", [3, 4], 3.0, 4),
                hand_example("Comedy", [2, 2], 2.4, 2), hand_example("Drama", [4, 5], 3.9, 5)]
    fidelity = TraceFidelity(HeuristicTeacher(), [])
    fidelity.implied = {("loves", "acclaimed"): 5.0, ("likes", "mixed"): 3.0, ("loves", "weak"): 4.0}
    texts = [trace("Drama", "loves", "acclaimed", "5"),   # all four agree; consistent (5 = implied)
             trace("Sci-Fi", "likes", "mixed", "4"),      # wrong category; 4 != implied 3
             trace("Comedy", "loves", "weak", "4"),       # wrong taste (dislikes) and rating (2); consistent
             "no tags at all"]                             # nothing
    f = fidelity(examples, texts)
    assert (f.category, f.taste, f.reception, f.rating, f.consistent) == (0.5, 0.5, 0.75, 0.5, 0.5)


def test_implied_ratings_are_medians_of_the_training_truth():
    """TraceFidelity fits, for each (taste, reception) the teacher writes, the median true rating."""
    train = [hand_example("Drama", [4, 5], 3.9, y) for y in (3, 5, 5, 4, 5)] + [hand_example("Drama", [3, 4], 3.0, 2)]
    fidelity = TraceFidelity(HeuristicTeacher(), train)
    assert fidelity.implied == {("loves", "acclaimed"): 5.0, ("likes", "mixed"): 2.0}


def test_judgement_reads_the_rating_on_the_data_scale():
    """On a 0.5-5 scale (MovieLens 20M) a trace ending at 0.5 has a rating; on 1-5 it has none."""
    trace = ("<analyze user>The user hates Drama; a strict rater.</analyze user><analyze item>A Drama item, "
             "panned by others.</analyze item><match>The user hates Drama; the item is panned.</match><rate>0.5</rate>")
    assert read_judgement(trace).rating is None
    assert read_judgement(trace, (0.5, 5.0)) == Judgement("Drama", "hates", "panned", 0.5)
