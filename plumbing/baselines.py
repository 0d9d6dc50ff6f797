"""Classic rating predictors to put beside the LLM: global mean, the best constant, user+item biases, matrix
factorisation.

They see only (user, item, rating) triples of the training split, never text. Predictions are clipped
to the rating scale; a user or item never seen in training contributes no bias (and no factors).
"""

from __future__ import annotations

import numpy as np

from data import RATING_SCALE, Rating


class _Baseline:
    """Shared parts: id -> index maps, the global mean, clipping to the rating scale."""

    def __init__(self, scale: tuple[float, float] = RATING_SCALE):
        self.scale, self.mu = scale, float(np.mean(scale))
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}

    def _index(self, train: list[Rating]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not train:
            raise ValueError("cannot fit on an empty training set")
        self.users = {u: k for k, u in enumerate(dict.fromkeys(r.user_id for r in train))}
        self.items = {i: k for k, i in enumerate(dict.fromkeys(r.item_id for r in train))}
        u = np.array([self.users[r.user_id] for r in train])
        i = np.array([self.items[r.item_id] for r in train])
        y = np.array([r.rating for r in train], dtype=float)
        self.mu = float(y.mean())
        return u, i, y

    def _raw(self, u: int | None, i: int | None) -> float:
        return self.mu  # u / i are training indices, None for a user or item never seen in training

    def predict(self, user_id: str, item_id: str) -> float:
        """Predicted rating clipped to the scale; unknown users/items fall back to the parts that are known."""
        value = self._raw(self.users.get(user_id), self.items.get(item_id))
        return float(min(max(value, self.scale[0]), self.scale[1]))

    def predict_many(self, pairs: list[Rating]) -> np.ndarray:
        """Predictions for the (user_id, item_id) of each rating record."""
        return np.array([self.predict(r.user_id, r.item_id) for r in pairs])


class GlobalMean(_Baseline):
    """Predicts the mean training rating for everyone."""

    def fit(self, train: list[Rating]) -> GlobalMean:
        """Store the global mean."""
        self._index(train)
        return self


class BestConstant(_Baseline):
    """One rating for everyone: the median training rating, the constant with the lowest MAE on the training
    split (the mean is RMSE's). Under a reward of 1 - |error| / span it is what a policy that ignores its prompt
    can do best, so an LLM that does not beat it has not learned to read the prompt."""

    def fit(self, train: list[Rating]) -> BestConstant:
        """Store the median training rating."""
        _, _, y = self._index(train)
        self.mu = float(np.median(y))  # argmin_c sum_i |y_i - c| (between two middle values, any c is optimal)
        return self


class BiasBaseline(_Baseline):
    """mu + b_u + b_i with L2-damped biases (Koren 2008, "Factorization meets the neighborhood", §2.1)."""

    def __init__(self, reg_user: float = 10.0, reg_item: float = 25.0, iters: int = 5, scale=RATING_SCALE):
        super().__init__(scale)
        self.reg_user, self.reg_item, self.iters = reg_user, reg_item, iters
        self.b_u, self.b_i = np.zeros(0), np.zeros(0)

    def fit(self, train: list[Rating]) -> BiasBaseline:
        """Alternate the closed-form ridge solutions for item and user biases."""
        u, i, y = self._index(train)
        n_u, n_i = np.bincount(u, minlength=len(self.users)), np.bincount(i, minlength=len(self.items))
        self.b_u = np.zeros(len(self.users))
        for _ in range(self.iters):
            # Koren 2008 eq. 2-3: b_i = sum(r - mu - b_u) / (lambda_i + |R(i)|), then b_u likewise.
            self.b_i = np.bincount(i, y - self.mu - self.b_u[u], len(self.items)) / (self.reg_item + n_i)
            self.b_u = np.bincount(u, y - self.mu - self.b_i[i], len(self.users)) / (self.reg_user + n_u)
        return self

    def _raw(self, u: int | None, i: int | None) -> float:
        return self.mu + (self.b_u[u] if u is not None else 0.0) + (self.b_i[i] if i is not None else 0.0)


class MatrixFactorization(BiasBaseline):
    """Biased MF, r_hat = mu + b_u + b_i + p_u . q_i, trained by mini-batch SGD (Koren et al. 2009)."""

    def __init__(self, factors: int = 16, epochs: int = 20, lr: float = 0.01, reg: float = 0.05,
                 batch: int = 128, seed: int = 0, scale=RATING_SCALE):
        super().__init__(scale=scale)
        self.factors, self.epochs, self.lr, self.reg, self.batch, self.seed = factors, epochs, lr, reg, batch, seed

    def fit(self, train: list[Rating]) -> MatrixFactorization:
        """Shuffle each epoch and apply the Funk-SVD updates per mini-batch (summed, so close to plain SGD)."""
        u, i, y = self._index(train)
        rng = np.random.default_rng(self.seed)
        self.b_u, self.b_i = np.zeros(len(self.users)), np.zeros(len(self.items))
        self.p = rng.normal(0.0, 0.1, (len(self.users), self.factors))
        self.q = rng.normal(0.0, 0.1, (len(self.items), self.factors))
        lr, reg = self.lr, self.reg
        for _ in range(self.epochs):
            order = rng.permutation(len(y))
            for start in range(0, len(y), self.batch):
                b = order[start : start + self.batch]
                ub, ib, pu, qi = u[b], i[b], self.p[u[b]], self.q[i[b]]
                e = y[b] - (self.mu + self.b_u[ub] + self.b_i[ib] + np.sum(pu * qi, axis=1))
                # SGD on 0.5 e^2 + 0.5 reg (b_u^2 + b_i^2 + |p_u|^2 + |q_i|^2); add.at sums repeated ids.
                np.add.at(self.b_u, ub, lr * (e - reg * self.b_u[ub]))
                np.add.at(self.b_i, ib, lr * (e - reg * self.b_i[ib]))
                np.add.at(self.p, ub, lr * (e[:, None] * qi - reg * pu))
                np.add.at(self.q, ib, lr * (e[:, None] * pu - reg * qi))
        return self

    def _raw(self, u: int | None, i: int | None) -> float:
        both = u is not None and i is not None  # the factor term needs both; otherwise only biases apply
        return super()._raw(u, i) + (float(self.p[u] @ self.q[i]) if both else 0.0)


def fit_baselines(train: list[Rating], seed: int = 0,
                  scale: tuple[float, float] = RATING_SCALE) -> dict[str, _Baseline]:
    """Fit the classic baselines with their default settings, predictions clipped to `scale`."""
    return {
        "global_mean": GlobalMean(scale).fit(train),
        "constant": BestConstant(scale).fit(train),
        "bias": BiasBaseline(scale=scale).fit(train),
        "mf": MatrixFactorization(seed=seed, scale=scale).fit(train),
    }
