"""Tests for plumbing/baselines.py: the classic predictors beat the global mean and are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from data import Rating
from plumbing.baselines import BestConstant, BiasBaseline, GlobalMean, MatrixFactorization


def synthetic_ratings(seed=0, n_users=150, n_items=80, n=6000):
    """Ratings with user and item effects: clip(round(3 + b_u + b_i + noise)), split 90/10."""
    rng = np.random.default_rng(seed)
    b_u, b_i = rng.normal(0, 0.7, n_users), rng.normal(0, 0.7, n_items)
    u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    y = np.clip(np.round(3 + b_u[u] + b_i[i] + rng.normal(0, 0.4, n)), 1, 5)
    ratings = [Rating(f"u{a}", f"i{b}", float(r), k) for k, (a, b, r) in enumerate(zip(u, i, y))]
    return ratings[: int(0.9 * n)], ratings[int(0.9 * n) :]


def mae(model, test):
    """Held-out mean absolute error of a fitted baseline."""
    return float(np.mean(np.abs(model.predict_many(test) - np.array([r.rating for r in test]))))


def test_baselines_beat_global_mean():
    """BiasBaseline and MatrixFactorization beat GlobalMean on held-out MAE when user/item effects exist."""
    train, test = synthetic_ratings()
    base = mae(GlobalMean().fit(train), test)
    bias = mae(BiasBaseline().fit(train), test)
    mf = mae(MatrixFactorization(seed=0).fit(train), test)
    assert bias < 0.8 * base and mf < 0.8 * base, (base, bias, mf)


def test_baselines_unknown_ids_and_clipping():
    """Unknown users/items fall back to the known parts; predictions stay on the 1-5 scale."""
    train, _ = synthetic_ratings(n=2000)
    for model in (GlobalMean().fit(train), BiasBaseline().fit(train), MatrixFactorization(epochs=2).fit(train)):
        assert model.predict("nobody", "nothing") == pytest.approx(min(max(model.mu, 1), 5))
        preds = model.predict_many(train)
        assert preds.min() >= 1 and preds.max() <= 5
        assert 1 <= model.predict("u0", "nothing") <= 5 and 1 <= model.predict("nobody", "i0") <= 5


def test_mf_deterministic():
    """MatrixFactorization is deterministic given its seed and differs across seeds."""
    train, test = synthetic_ratings(n=2000)
    a = MatrixFactorization(seed=3, epochs=5).fit(train).predict_many(test)
    b = MatrixFactorization(seed=3, epochs=5).fit(train).predict_many(test)
    c = MatrixFactorization(seed=4, epochs=5).fit(train).predict_many(test)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_best_constant_is_the_training_median():
    """By hand: ratings 1, 4, 4, 5, 5 -> median 4 (MAE 5/5 = 1.0; the mean 3.8 scores 5.6/5 = 1.12); an even count takes the
    midpoint of the two middle values; the same rating for every pair, seen or not."""
    train = [Rating("u", f"i{k}", r, k) for k, r in enumerate([5.0, 1.0, 4.0, 5.0, 4.0])]
    model = BestConstant().fit(train)
    assert model.mu == 4.0 and model.predict("u", "i0") == model.predict("nobody", "nothing") == 4.0
    assert mae(model, train) == pytest.approx(1.0) and mae(GlobalMean().fit(train), train) == pytest.approx(1.12)
    assert BestConstant().fit(train[:4]).mu == 4.5  # 1, 4, 5, 5
