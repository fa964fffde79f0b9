"""Retention env on a small synthetic world: determinism, slates, rewards, metrics, errors."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sec_online.clusters import VideoClusters
from sec_online.data import LOG_DTYPES, event_ids
from sec_online.evaluation.dataset import EvalDataset, build_dataset
from sec_online.evaluation.env import RetentionEnv, rollout_seeds
from sec_online.evaluation.simulator import UserSimulator
from sec_online.sessions import assign_sessions
from sec_online.settings import Settings

DAY = 86_400_000
DAY0 = 1_650_816_000_000  # 2022-04-25 00:00 in UTC+8
CLUSTERS = 4
SETTINGS = Settings(data_dir=None, clusters=CLUSTERS, levels=2)
SIGNALS = ("is_click", "long_view", "is_like", "is_comment", "is_forward", "is_follow", "is_hate")


def synthetic_world(users: int = 80, days: int = 6, seed: int = 0) -> EvalDataset:
    """Users who click videos of cluster 0 far more often than others; days 4 and 5 are test days.

    Cluster 3 has only 2 videos, the others 12 each.
    """
    rng = np.random.default_rng(seed)
    video_ids = np.arange(100, 138)
    cluster_of = {int(v): (int(v - 100) % 3 if v < 136 else 3) for v in video_ids}
    records = []
    for user in range(users):
        for day in range(days):
            if rng.random() < 0.35:
                continue
            start = DAY0 + day * DAY + int(rng.integers(8, 20)) * 3_600_000
            for request in range(int(rng.integers(1, 4))):
                video = int(rng.choice(video_ids))
                click = int(rng.random() < (0.8 if cluster_of[video] == 0 else 0.15))
                record = dict.fromkeys(SIGNALS, 0)
                record.update(is_click=click, long_view=int(click and rng.random() < 0.5))
                record.update(is_like=int(click and rng.random() < 0.2))
                records.append(
                    {
                        **record,
                        "user_id": user,
                        "video_id": video,
                        "time_ms": start + request * 120_000,
                        "play_time_ms": 8_000 if click else 500,
                        "duration_ms": 10_000,
                        "tab": 1,
                        "date": 20220425 + day,
                    }
                )
    log = pd.DataFrame(records).astype(dict(LOG_DTYPES))
    log = log.sort_values("time_ms", kind="stable", ignore_index=True)
    log["event_id"] = event_ids(log)
    features = pd.DataFrame(
        {
            "video_id": video_ids,
            "video_type": "NORMAL",
            "upload_type": "A",
            "video_duration": 10_000.0,
            "server_width": 720.0,
            "server_height": 1280.0,
            "tag": [str(cluster_of[int(v)]) for v in video_ids],
        }
    ).astype({"video_type": "string", "upload_type": "string", "tag": "string"})
    clusters = VideoClusters(cluster_of, clusters=CLUSTERS)
    return build_dataset(
        assign_sessions(log, SETTINGS), SETTINGS, clusters, split_day=4, video_features=features
    )


class FixedPolicy:
    """Same action for every user; reports a selected level when ``levels`` is set."""

    def __init__(self, action: list[float], action_type: str, levels: bool = False) -> None:
        self.name = f"fixed-{action_type}"
        self.action_type = action_type
        self.action = torch.tensor(action)
        self.levels = levels
        self.last_selected_levels: torch.Tensor | None = None

    def act(self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator):
        if self.levels:
            self.last_selected_levels = levels.clone()
        return self.action.expand(states.shape[0], -1).clone()


class RandomPolicy:
    """Random cluster distributions drawn from the generator that the env passes."""

    name = "random"
    action_type = "discrete"

    def act(self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator):
        return torch.rand(states.shape[0], CLUSTERS, generator=generator)


@pytest.fixture(scope="module")
def world() -> tuple[EvalDataset, UserSimulator]:
    dataset = synthetic_world()
    return dataset, UserSimulator.fit(dataset, seed=0, epochs=20, batch_size=64)


def make_env(world, **options) -> RetentionEnv:
    dataset, simulator = world
    options = {"users": 30, "seed": 5, **options}
    return RetentionEnv(simulator, dataset, SETTINGS, **options)


def test_rollout_is_deterministic(world):
    env = make_env(world)
    first = env.rollout(RandomPolicy(), seed=11)
    torch.manual_seed(123)  # the global RNG must not matter
    second = make_env(world).rollout(RandomPolicy(), seed=11)
    assert first.metrics == second.metrics
    assert torch.equal(first.user_returns, second.user_returns)
    assert first.steps == second.steps
    other = env.rollout(RandomPolicy(), seed=12)
    assert not torch.equal(other.user_returns, first.user_returns)


def test_reset_observation(world):
    dataset, _ = world
    env = make_env(world)
    observation = env.reset(seed=1)
    assert observation.states.shape == (30, dataset.n_features)
    assert observation.states.dtype == torch.float32
    assert observation.levels.dtype == torch.long
    assert bool(observation.active.all())
    assert observation.day.tolist() == [0] * 30
    assert set(env.user_ids.tolist()) <= set(dataset.test_users().tolist())
    assert not env.done


def test_users_sampled_by_seed(world):
    assert np.array_equal(make_env(world, seed=1).user_ids, make_env(world, seed=1).user_ids)
    assert not np.array_equal(make_env(world, seed=1).user_ids, make_env(world, seed=2).user_ids)


def test_levels_follow_boundaries(world):
    dataset, _ = world
    env = make_env(world)
    observation = env.reset(seed=0)
    for row, state in enumerate(env.user_states):
        score = state["retention_score"]
        expected = 0 if score is None else sum(score >= b for b in dataset.level_boundaries)
        assert observation.levels[row] == expected


def test_rewards_are_engagement_minus_gaps(world):
    env = make_env(world)
    observation = env.reset(seed=3)
    policy = FixedPolicy([1.0, 1.0, 1.0, 1.0], "discrete")
    generator = torch.Generator().manual_seed(0)
    total_reward, engagement, gaps = 0.0, 0.0, []
    while not env.done:
        actions = policy.act(observation.states, observation.levels, generator)
        observation, rewards, info = env.step(actions)
        assert bool((rewards[~info["stepped"]] == 0).all())
        total_reward += float(rewards.sum())
        engagement += float(info["engagement"].sum())
        gaps += info["gap_days"][info["day_end"]].tolist()
        assert bool(info["gap_days"][~info["day_end"]].isnan().all())
        assert bool((observation.day[observation.active] < 10).all())
    metrics = env.metrics()
    assert total_reward == pytest.approx(engagement - sum(gaps), abs=1e-3)
    assert metrics["episode_return"] == pytest.approx(total_reward / 30, abs=1e-4)
    assert metrics["user_days"] == len(gaps)
    assert metrics["return_time"] == pytest.approx(np.mean(gaps))
    assert metrics["day1_retention"] == pytest.approx(np.mean(np.array(gaps) == 1))
    assert min(gaps) >= 1
    assert max(gaps) <= 10


def test_each_user_covers_the_horizon(world):
    env = make_env(world, horizon_days=4)
    observation = env.reset(seed=2)
    policy = FixedPolicy([1.0, 1.0, 1.0, 1.0], "discrete")
    days_until_done = torch.zeros(30)
    generator = torch.Generator()
    while not env.done:
        actions = policy.act(observation.states, observation.levels, generator)
        observation, _, info = env.step(actions)
        days_until_done += torch.where(info["day_end"], info["gap_days"], 0.0)
    # A user is done once their next day is at or beyond the horizon, counted from day 0.
    assert bool((days_until_done >= 4).all())
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(torch.ones(30, CLUSTERS))


def test_discrete_slates_come_from_chosen_cluster(world):
    env = make_env(world)
    result = env.rollout(FixedPolicy([1.0, 0.0, 0.0, 0.0], "discrete"), seed=4)
    assert result.metrics["distinct_clusters"] == 1.0
    for state in env.user_states:
        for session in state["open"].values():
            assert set(session["clusters"]) <= {"0"}


def test_slates_do_not_repeat_videos(world):
    dataset, _ = world
    env = make_env(world, slate_size=6)
    env.reset(seed=1)
    slates = env._discrete_slates(torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(200, -1))
    assert all(len(set(slate)) == 6 for slate in slates.tolist())
    assert {int(dataset.video_cluster[row]) for row in slates.flatten().tolist()} == {0}
    # Cluster 3 has 2 videos, so a slate of 6 from it must repeat them evenly.
    small = env._discrete_slates(torch.tensor([[0.0, 0.0, 0.0, 1.0]]).expand(50, -1))
    for slate in small.tolist():
        assert sorted(slate.count(row) for row in set(slate)) == [3, 3]


def test_slate_draws_follow_popularity_pool(world):
    dataset, _ = world
    env = make_env(world)
    pools, sizes = env._pools, env._pool_sizes
    for cluster in range(CLUSTERS):
        members = pools[cluster, : sizes[cluster]].numpy()
        popularity = dataset.video_popularity[members]
        assert bool((np.diff(popularity) <= 0).all())
        assert bool((dataset.video_cluster[members] == cluster).all())


def test_continuous_weights_steer_clicks(world):
    env = make_env(world, users=40)
    like_clicks = FixedPolicy([1.0, 0, 0, 0, 0, 0, 0], "continuous")
    avoid_clicks = FixedPolicy([-1.0, 0, 0, 0, 0, 0, 0], "continuous")
    liked = env.rollout(like_clicks, seed=0).metrics
    avoided = env.rollout(avoid_clicks, seed=0).metrics
    assert liked["click_rate"] > avoided["click_rate"] + 0.1


def test_max_requests_ends_days(world):
    metrics = make_env(world, max_requests=1).rollout(RandomPolicy(), seed=0).metrics
    assert metrics["requests_per_user_day"] == 1.0
    assert metrics["requests"] == metrics["user_days"]


def test_impressions_reach_user_states(world):
    env = make_env(world)
    env.reset(seed=0)
    before = sum(state["impressions"] for state in env.user_states)
    result = env.rollout(RandomPolicy(), seed=0)
    after = sum(state["impressions"] for state in env.user_states)
    assert after - before == result.metrics["impressions"]
    assert result.metrics["impressions"] == 6 * result.metrics["requests"]


def test_metrics_values(world):
    dataset, _ = world
    env = make_env(world)
    result = env.rollout(FixedPolicy([1.0, 1.0, 1.0, 1.0], "discrete", levels=True), seed=0)
    metrics = result.metrics
    for name in ("click_rate", "long_view_rate", "like_rate", "day1_retention"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["like_rate"] <= metrics["click_rate"]
    assert 1.0 <= metrics["distinct_clusters"] <= CLUSTERS
    # Identical rows (1/4 each, norm 1/2) span one direction: the norm is sqrt(30) / 2.
    assert metrics["nuclear_norm_first_step"] == pytest.approx(math.sqrt(30) / 2, rel=1e-5)
    assert metrics["users"] == 30
    assert metrics["policy"] == "fixed-discrete"
    assert metrics["seed"] == 0
    shares = metrics["level_selected"]
    assert set(shares) <= {str(level) for level in range(dataset.levels)}
    assert sum(shares.values()) == pytest.approx(1.0)
    without = env.rollout(FixedPolicy([1.0, 1.0, 1.0, 1.0], "discrete"), seed=0).metrics
    assert "level_selected" not in without


def test_rollout_seeds_differ():
    env_seed, policy_seed = rollout_seeds(0)
    assert env_seed != policy_seed
    assert rollout_seeds(0) == (env_seed, policy_seed)
    assert rollout_seeds(1) != rollout_seeds(0)


def test_invalid_actions(world):
    env = make_env(world)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"discrete actions must have shape \[30, 4\]"):
        env.step(torch.ones(30, 5), "discrete")
    with pytest.raises(ValueError, match="non-negative"):
        env.step(-torch.ones(30, CLUSTERS))
    with pytest.raises(ValueError, match="positive sum"):
        env.step(torch.zeros(30, CLUSTERS))
    with pytest.raises(ValueError, match="finite"):
        env.step(torch.full((30, 7), float("nan")))
    with pytest.raises(ValueError, match="action_type must be"):
        env.step(torch.ones(30, CLUSTERS), "other")
    bad = FixedPolicy([1.0], "discrete")
    bad.action_type = "ranking"
    with pytest.raises(ValueError, match="has action_type 'ranking'"):
        env.rollout(bad, seed=0)


def test_invalid_arguments(world):
    dataset, simulator = world
    with pytest.raises(ValueError, match=r"users=1000 exceeds the \d+ users active on test days"):
        make_env(world, users=1000)
    with pytest.raises(ValueError, match="horizon_days must be at least 1"):
        make_env(world, horizon_days=0)
    with pytest.raises(ValueError, match="slate_size=9 exceeds the 8 candidates"):
        make_env(world, slate_size=9, candidates=8)
    with pytest.raises(ValueError, match="SEC_LEVELS=3"):
        RetentionEnv(simulator, dataset, dataclasses.replace(SETTINGS, levels=3), users=5)


def test_large_slates_warn(world, caplog):
    with caplog.at_level(logging.WARNING, logger="sec_online.evaluation.env"):
        make_env(world, slate_size=6)
    assert "slate_size=6 exceeds the largest logged slate size 1" in caplog.text


def test_candidates_capped_at_pool(world, caplog):
    with caplog.at_level(logging.WARNING, logger="sec_online.evaluation.env"):
        env = make_env(world, candidates=500)
    assert env.candidates == 38
    assert "candidates=500 exceeds the 38 videos shown on train days" in caplog.text
