"""DAPO's dynamic sampling (--filter-groups): which groups carry a signal, how kept groups are cut out of
a batch and joined, the draw loop by hand, and in a tiny run, exact replay after --resume."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import TINY, metrics

import train
from grpo import RolloutBatch, concat_batches, groups_with_signal, select_groups
from reczero import Reward

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(rewards: list[list[float]], width: int = 6) -> RolloutBatch:
    """Groups of rows (one list of rewards per prompt), prompt-major; row k's tokens are all k."""
    index = [p for p, group in enumerate(rewards) for _ in group]
    n = len(index)
    ids = torch.arange(n)[:, None].expand(n, width).clone()
    return RolloutBatch(ids, torch.full((n,), 2), torch.full((n,), width - 2), torch.zeros(n, dtype=torch.bool),
                        torch.tensor(index), torch.tensor([r for group in rewards for r in group]),
                        ids.float() / 10)


def test_groups_with_signal():
    """Prompt 0 (0.5, 0.5) and prompt 2 (1, 1, 1) are tied; prompt 1 (0, 1) and prompt 3 (0.2, 0.3) are not;
    the ids come from prompt_index, not row order."""
    b = batch([[0.5, 0.5], [0.0, 1.0], [1.0, 1.0, 1.0], [0.2, 0.3]])
    assert groups_with_signal(b.rewards, b.prompt_index) == [1, 3]
    order = torch.randperm(len(b.rewards), generator=torch.Generator().manual_seed(0))
    assert groups_with_signal(b.rewards[order], b.prompt_index[order]) == [1, 3]


def test_select_and_concat_keep_rows_together_and_renumber():
    a = select_groups(batch([[0.5, 0.5], [0.0, 1.0], [0.2, 0.3]]), [2, 1])  # prompt 2 first, then 1
    assert a.prompt_index.tolist() == [1, 1, 0, 0]  # rows keep their order; ids follow the list given
    assert a.input_ids[:, 0].tolist() == [2, 3, 4, 5] and a.rewards.tolist() == pytest.approx([0.0, 1.0, 0.2, 0.3])
    b = batch([[1.0, 0.0]], width=9)
    joined = concat_batches(a, b)
    assert joined.input_ids.shape == (6, 9) and joined.sampler_logprobs.shape == (6, 9)
    assert joined.prompt_index.tolist() == [1, 1, 0, 0, 2, 2]  # b's prompt 0 becomes 2
    assert joined.input_ids[4, :9].tolist() == [0] * 9 and joined.input_ids[0, 6:].tolist() == [0, 0, 0]
    assert concat_batches(select_groups(b, []), b).prompt_index.tolist() == [0, 0]  # nothing kept yet


def fake_rollouts(monkeypatch, draws: list[list[list[float]]]):
    """train.rollout returns draw d's groups with the given rewards, whatever it is asked."""
    calls = []

    def rollout(model, examples, prompter, sampling, reward_cfg, samples, generator):
        rewards = draws[len(calls)]
        calls.append(len(examples))
        b = batch(rewards)
        flat = [r for group in rewards for r in group]
        return train.Rollout([f"d{len(calls) - 1}p{p}" for p in range(len(rewards))], [f"t{k}" for k in range(len(flat))],
                             [Reward(r, 0.5, r, True, 4.0) for r in flat], b)

    monkeypatch.setattr(train, "rollout", rollout)
    return calls


class Flags:
    seed, samples, prompts_per_step = 0, 2, 2

    def __init__(self, extra_draws):
        self.extra_draws = extra_draws


class Task:
    train = list(range(50))


def test_filter_groups_draws_until_the_step_has_its_groups(monkeypatch):
    """Draw 0: one tied group, one with signal; draw 1: two with signal. The step keeps draw 0's group and
    the first of draw 1's (cut to --prompts-per-step 2); of the 4 groups drawn 1 was tied."""
    calls = fake_rollouts(monkeypatch, [[[0.5, 0.5], [0.0, 1.0]], [[0.1, 0.9], [1.0, 0.0]], [[0.3, 0.4]]])
    first = train.rollout(None, [0, 1], None, None, None, 2, None)
    kept, record = train.filter_groups(first, None, None, Task(), Flags(4), None, None, 7, "cpu")
    assert calls == [2, 2]  # the first draw, and one more
    assert kept.examples == ["d0p1", "d1p0"] and kept.batch.rewards.tolist() == pytest.approx([0.0, 1.0, 0.1, 0.9])
    assert kept.texts == ["t2", "t3", "t0", "t1"] and kept.batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert record == {"filter_draws": 2, "filter_groups_kept": 2, "filter_zero_std_share": 0.25}


def test_filter_groups_stops_at_the_cap(monkeypatch):
    """Every draw tied: after --extra-draws 2 more draws the step trains on the first draw (advantage 0
    everywhere, as without filtering), and says all were tied."""
    fake_rollouts(monkeypatch, [[[1.0, 1.0], [0.0, 0.0]]] * 3)
    first = train.rollout(None, [0, 1], None, None, None, 2, None)
    kept, record = train.filter_groups(first, None, None, Task(), Flags(2), None, None, 0, "cpu")
    assert kept is first and record == {"filter_draws": 3, "filter_groups_kept": 0, "filter_zero_std_share": 1.0}


def tied_for_high_ratings(monkeypatch):
    """Rewards that differ within a group for examples rated below 4 and are all equal for the others, so
    some groups are dropped and more are drawn."""
    def reward(text, truth, cfg):
        r = 0.5 if truth >= 4 else (sum(text.encode()) % 13) / 13
        return Reward(r, 0.0, r, False, None)

    monkeypatch.setattr(train, "compute_reward", reward)


def test_a_run_with_filter_groups_logs_its_draws_and_resumes_exactly(tmp_path, monkeypatch):
    tied_for_high_ratings(monkeypatch)
    args = TINY + ["--filter-groups", "--extra-draws", "3", "--steps", "3", "--save-every", "1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train.main(args + ["--out", str(whole)])
    steps = metrics(whole)
    assert all(1 <= s["filter_draws"] <= 4 and s["filter_groups_kept"] <= 2 for s in steps.values())
    assert any(s["filter_draws"] > 1 for s in steps.values())  # some groups were tied and more were drawn
    assert all(s["frac_reward_zero_std"] == 0 for s in steps.values() if s["filter_groups_kept"])
    train.main(args + ["--out", str(part), "--steps", "1"])
    train.main(["--resume", str(part / "checkpoint"), "--steps", "3"])
    again = metrics(part)
    for step in (2, 3):
        for key in ("filter_draws", "filter_groups_kept", "loss", "grad_norm", "reward_mean"):
            assert again[step][key] == pytest.approx(steps[step][key], abs=1e-6), (step, key)
    assert json.loads((part / "checkpoint" / "trainer_state.json").read_text())["args"]["filter_groups"] is True


def test_filter_groups_under_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--filter-groups", "--prompts-per-step", "2"])
    assert stop.value.code == 2 and "--filter-groups runs in one process" in capsys.readouterr().err
