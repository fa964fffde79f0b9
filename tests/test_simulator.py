"""User simulator: hazard likelihood by hand, fit determinism, ranges, save/load, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sec_online.clusters import VideoClusters
from sec_online.data import LOG_DTYPES, event_ids
from sec_online.evaluation.dataset import EvalDataset, build_dataset
from sec_online.evaluation.simulator import (
    N_AGGREGATES,
    UserSimulator,
    day_aggregates,
    hazard_distribution,
    hazard_log_likelihood,
    logged_day_aggregates,
    train_window_gaps,
)
from sec_online.sessions import assign_sessions
from sec_online.settings import Settings

MINUTE = 60_000
DAY = 86_400_000
DAY0 = 1_650_816_000_000  # 2022-04-25 00:00 in UTC+8
SETTINGS = Settings(data_dir=None, clusters=4, levels=3)
SIGNAL_COLUMNS = ["is_click", "long_view", "is_like", "is_comment", "is_forward", "is_follow"]


def synthetic_world(users: int = 160, days: int = 6, seed: int = 0) -> EvalDataset:
    """A log where clicks depend on the user's taste, the video's quality and its cluster.

    Each user prefers one of 4 clusters and is shown it 60% of the time, so the state's cluster
    shares reveal the taste. Days 0..3 are train days, 4..5 test days.
    """
    rng = np.random.default_rng(seed)
    video_ids = np.arange(100, 148)
    quality = rng.normal(size=len(video_ids))
    clusters = VideoClusters({int(v): int(v - 100) % 4 for v in video_ids}, clusters=4)
    records = []
    for user in range(users):
        taste, propensity, activity = user % 4, rng.normal(-0.5, 0.7), rng.uniform(0.35, 0.95)
        for day in range(days):
            if rng.random() > activity:
                continue
            start = DAY0 + day * DAY + int(rng.integers(8, 20)) * 3_600_000
            for request in range(min(int(rng.geometric(0.45)), 6)):
                for _ in range(1 if rng.random() < 0.9 else 2):
                    cluster = taste if rng.random() < 0.6 else int(rng.integers(4))
                    index = 4 * int(rng.integers(12)) + cluster
                    logit = propensity + 0.8 * quality[index] + 1.5 * (cluster == taste) - 0.5
                    click = int(rng.random() < 1 / (1 + math.exp(-logit)))
                    records.append(
                        {
                            "user_id": user,
                            "video_id": int(video_ids[index]),
                            "time_ms": start + request * 2 * MINUTE,
                            "is_click": click,
                            "long_view": int(click and rng.random() < 0.6),
                            "is_like": int(click and rng.random() < 0.15),
                            "is_comment": int(rng.random() < 0.01),
                            "is_forward": int(rng.random() < 0.01),
                            "is_follow": int(rng.random() < 0.01),
                            "is_hate": int(rng.random() < 0.01),
                            "play_time_ms": 9_000 if click else 1_000,
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
            "upload_type": np.where(video_ids % 3 == 0, "A", "B"),
            "video_duration": 10_000.0 + 100.0 * (video_ids % 7),
            "server_width": 720.0,
            "server_height": 1280.0,
            "tag": [str((v - 100) % 4) for v in video_ids],
        }
    ).astype({"video_type": "string", "upload_type": "string", "tag": "string"})
    return build_dataset(
        assign_sessions(log, SETTINGS), SETTINGS, clusters, split_day=4, video_features=features
    )


@pytest.fixture(scope="module")
def dataset() -> EvalDataset:
    return synthetic_world()


@pytest.fixture(scope="module")
def simulator(dataset: EvalDataset) -> UserSimulator:
    return UserSimulator.fit(dataset, seed=3, epochs=30, batch_size=64)


def test_hazard_distribution_by_hand():
    logits = torch.linspace(-1.0, 1.4, 9)[None, :]
    hazards = torch.sigmoid(logits)[0].tolist()
    expected, survival = [], 1.0
    for hazard in hazards:
        expected.append(hazard * survival)
        survival *= 1.0 - hazard
    expected.append(survival)
    probs = hazard_distribution(logits)
    assert probs.shape == (1, 10)
    assert probs[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)


def test_hazard_rows_sum_to_one_for_extreme_logits():
    logits = torch.tensor(
        [[-40.0] * 9, [40.0] * 9, [0.0, 30.0, -30.0, 5.0, -5.0, 1.0, 2.0, 3.0, 4.0]]
    )
    probs = hazard_distribution(logits)
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-6)
    assert bool((probs >= 0).all())
    assert float(probs[0, 9]) == pytest.approx(1.0, abs=1e-6)  # never returns: "10 or more"
    assert float(probs[1, 0]) == pytest.approx(1.0, abs=1e-6)  # returns the next day


def test_hazard_likelihood_by_hand():
    logits = torch.linspace(-1.0, 1.4, 9).repeat(6, 1)
    h = torch.sigmoid(logits[0]).tolist()
    log_h = [math.log(value) for value in h]
    log_s = [math.log(1.0 - value) for value in h]
    nan = float("nan")
    gaps = torch.tensor([1.0, 3.0, 10.0, nan, nan, nan])
    censored_at = torch.tensor([nan, nan, nan, 2.0, 0.0, 12.0])
    expected = [
        log_h[0],
        log_s[0] + log_s[1] + log_h[2],
        sum(log_s),
        log_s[0] + log_s[1],  # censored at 2: survived days 1 and 2, nothing else
        0.0,  # censored at 0: no information
        sum(log_s),  # censored beyond the last hazard: survived all nine
    ]
    assert hazard_log_likelihood(logits, gaps, censored_at).tolist() == pytest.approx(
        expected, rel=1e-5
    )


def test_censored_rows_only_push_hazards_down():
    logits = torch.linspace(-1.0, 1.4, 9).repeat(2, 1).requires_grad_(True)
    gaps = torch.tensor([3.0, float("nan")])
    censored_at = torch.tensor([float("nan"), 2.0])
    hazard_log_likelihood(logits, gaps, censored_at).sum().backward()
    h = torch.sigmoid(logits.detach()[0])
    # d/dz log(1 - sigmoid(z)) = -sigmoid(z) and d/dz log sigmoid(z) = 1 - sigmoid(z).
    observed = [-h[0], -h[1], 1 - h[2], *[0.0] * 6]
    censored = [-h[0], -h[1], *[0.0] * 7]
    assert logits.grad[0].tolist() == pytest.approx([float(v) for v in observed], rel=1e-5)
    assert logits.grad[1].tolist() == pytest.approx([float(v) for v in censored], rel=1e-5)


def test_train_window_gaps_censor_at_split():
    days = pd.DataFrame(
        {
            "day": [0, 1, 2, 3, 3],
            "gap_days": [1.0, 3.0, float("nan"), 1.0, 10.0],
        }
    )
    gaps, censored_at = train_window_gaps(days, split_day=5)
    # Day 1's gap ends on day 4, the last train day: observed. Day 3's 10-day gap ends after
    # the split, so it is censored at the last train day.
    assert gaps.tolist()[:2] == [1.0, 3.0]
    assert math.isnan(gaps[2])
    assert censored_at[2] == 2.0
    assert gaps[3] == 1.0
    assert math.isnan(gaps[4])
    assert censored_at[4] == 1.0
    assert math.isnan(censored_at[0])


def test_day_aggregates_values():
    aggregates = day_aggregates(
        torch.tensor([1.0, 3.0]),
        torch.tensor([2.0, 0.0]),
        torch.tensor([[1.0, 2.0, 0, 0, 0, 0, 0], [0.0] * 7]),
        torch.tensor([1.5, 0.0]),
    )
    assert aggregates.shape == (2, N_AGGREGATES)
    assert aggregates[0].tolist() == pytest.approx([math.log(2), 0.5, 1.0, 0, 0, 0, 0, 0, 0.75])
    assert aggregates[1].tolist() == pytest.approx([math.log(4), *[0.0] * 8])


def test_logged_aggregates_match_helper(dataset):
    days = dataset.days.iloc[:5]
    rates = days[[c for c in days.columns if c.startswith("day_rate_")]].to_numpy()
    impressions = days["impressions"].to_numpy()
    expected = day_aggregates(
        torch.tensor(days["requests"].to_numpy(), dtype=torch.float32),
        torch.tensor(impressions, dtype=torch.float32),
        torch.tensor(rates * impressions[:, None], dtype=torch.float32),
        torch.tensor(days["day_watch_ratio"].to_numpy() * impressions, dtype=torch.float32),
    )
    assert torch.allclose(logged_day_aggregates(days), expected, atol=1e-6)


def predictions(simulator: UserSimulator, dataset: EvalDataset) -> list[torch.Tensor]:
    states = torch.tensor(dataset.states(dataset.days))
    batch = states.shape[0]
    videos = torch.arange(dataset.n_videos).repeat(batch, 1)[:, :6]
    feedback = torch.tensor(
        dataset.requests[
            ["click", "long_view", "like", "comment", "forward", "follow", "hate"]
        ].to_numpy()[:batch],
        dtype=torch.float32,
    )
    index = torch.arange(batch) % 4
    aggregates = logged_day_aggregates(dataset.days)
    return [
        simulator.response_probs(states, videos),
        simulator.watch_ratios(states, videos, torch.ones(batch, 6)),
        simulator.leave_prob(states, feedback, index),
        simulator.return_distribution(states, aggregates),
    ]


def test_predictions_in_range(simulator, dataset):
    probs, watch, leave, returns = predictions(simulator, dataset)
    batch = len(dataset.days)
    assert probs.shape == (batch, 6, 7)
    assert bool(((probs > 0) & (probs < 1)).all())
    assert watch.shape == (batch, 6)
    assert bool(((watch >= 0) & (watch <= 3)).all())
    assert leave.shape == (batch,)
    assert bool(((leave > 0) & (leave < 1)).all())
    assert returns.shape == (batch, 10)
    assert torch.allclose(returns.sum(dim=1), torch.ones(batch), atol=1e-5)


def test_sampled_responses(simulator, dataset):
    states = torch.tensor(dataset.states(dataset.days))[:50]
    videos = torch.arange(6).repeat(50, 1)
    signals, watch = simulator.sample_responses(states, videos, torch.Generator().manual_seed(1))
    again, _ = simulator.sample_responses(states, videos, torch.Generator().manual_seed(1))
    assert torch.equal(signals, again)
    assert signals.shape == (50, 6, 7)
    assert set(signals.unique().tolist()) <= {0.0, 1.0}
    long_view = signals[..., 1]
    assert torch.equal(watch, simulator.watch_ratios(states, videos, long_view))


def test_fit_is_deterministic(simulator, dataset):
    state = torch.random.get_rng_state()
    again = UserSimulator.fit(dataset, seed=3, epochs=30, batch_size=64)
    assert torch.equal(torch.random.get_rng_state(), state), "fit must not use the global RNG"
    for first, second in zip(
        predictions(simulator, dataset), predictions(again, dataset), strict=True
    ):
        assert torch.equal(first, second)
    other = UserSimulator.fit(dataset, seed=4, epochs=1, batch_size=128)
    assert not torch.equal(predictions(other, dataset)[0], predictions(simulator, dataset)[0])


def test_fit_learns_clicks(simulator, dataset):
    validation = simulator.validate(dataset, seed=0)
    assert validation["auc"]["click"]["auc"] > 0.65
    assert (
        simulator.training["response"]["losses"][-1] < simulator.training["response"]["losses"][0]
    )
    assert simulator.training["return"]["losses"][-1] < simulator.training["return"]["losses"][0]


def test_validate_report(simulator, dataset):
    validation = simulator.validate(dataset, seed=0)
    json.dumps(validation, allow_nan=False)
    assert validation == simulator.validate(dataset, seed=0)
    for split in ("train", "test"):
        gaps = validation["return_gap"][split]
        assert len(gaps["real"]) == len(gaps["simulated"]) == 10
        assert sum(gaps["real"]) == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= gaps["total_variation"] <= 1.0
        lengths = validation["session_length"][split]
        assert lengths["real_mean"] >= 1.0
        assert 1.0 <= lengths["simulated_mean"] <= 30.0
        assert gaps["note"] and lengths["note"]
    # Test days are 4 and 5 of 0..5, so only gaps of 1 day can be observed there.
    assert validation["return_gap"]["test"]["real"][1:] == [0.0] * 9
    assert validation["return_gap"]["test"]["simulated"][1:] == [0.0] * 9


def test_save_and_load(simulator, dataset, tmp_path):
    path = tmp_path / "simulator.pt"
    simulator.save(path)
    loaded = UserSimulator.load(path)
    for first, second in zip(
        predictions(simulator, dataset), predictions(loaded, dataset), strict=True
    ):
        assert torch.equal(first, second)
    assert loaded.training == simulator.training
    assert np.array_equal(loaded.video_ids, dataset.video_ids)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, path)
    with pytest.raises(ValueError, match="expected a 'user-simulator/1' file"):
        UserSimulator.load(path)
    with pytest.raises(ValueError, match="cannot read a user simulator"):
        UserSimulator.load(tmp_path / "missing.pt")


def test_invalid_inputs(simulator, dataset):
    states = torch.zeros(2, dataset.n_features)
    with pytest.raises(ValueError, match="states must have shape"):
        simulator.response_probs(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="video rows must be in"):
        simulator.response_probs(states, torch.full((2, 1), dataset.n_videos))
    with pytest.raises(ValueError, match="long tensor"):
        simulator.response_probs(states, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="feedback must have shape"):
        simulator.leave_prob(states, torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="aggregates must have shape"):
        simulator.return_distribution(states, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="epochs and batch_size"):
        UserSimulator.fit(dataset, epochs=0)
