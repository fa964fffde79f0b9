from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from sec_online.clusters import VideoClusters
from sec_online.data import LOG_DTYPES, event_ids
from sec_online.evaluation.baselines import (
    CEMConfig,
    ReplayBuffer,
    TD3Agent,
    TD3Config,
    TD3Policy,
    _TransitionCollector,
    cross_entropy_search,
    episode_return,
    train_cem,
    train_td3,
)
from sec_online.evaluation.dataset import EvalDataset, build_dataset
from sec_online.evaluation.demonstrations import (
    DEFAULT_FUSION_WEIGHTS,
    BehaviourPolicy,
    continuous_demonstrations,
)
from sec_online.evaluation.env import RetentionEnv
from sec_online.evaluation.policies import (
    FUSION_WEIGHTS,
    FixedWeightsPolicy,
    PopularPolicy,
    RandomPolicy,
    cloned_variants,
    train_cloned,
)
from sec_online.evaluation.simulator import UserSimulator
from sec_online.sessions import assign_sessions
from sec_online.settings import Settings

N_FEATURES = 3
TARGET = torch.tensor([0.6, 0.4, 0.2, 0.0, -0.2, 0.1, -0.8])


@dataclass
class FakeObservation:
    states: torch.Tensor
    levels: torch.Tensor
    active: torch.Tensor
    day: torch.Tensor


class FakeEnv:
    """A tiny stand-in with the reset/step/done interface of ``RetentionEnv``.

    User ``i`` is inactive at steps ``t`` with ``(t + i) % 4 == 3``, like a user between two
    days. An active user's reward is ``-||action - TARGET||^2``, so the best fixed weights are
    ``TARGET``. States are seeded noise plus the step index.
    """

    def __init__(self, users: int = 6, steps: int = 8, seed: int = 0) -> None:
        self.users = users
        self.steps = steps
        self.seed = seed
        self.t = 0
        self.generator = torch.Generator()

    def reset(self) -> FakeObservation:
        self.t = 0
        self.generator.manual_seed(self.seed)
        return self._observation()

    @property
    def done(self) -> bool:
        return self.t >= self.steps

    def step(
        self, actions: torch.Tensor, action_type: str | None = None
    ) -> tuple[FakeObservation, torch.Tensor, dict]:
        assert action_type == "continuous"
        assert actions.shape == (self.users, FUSION_WEIGHTS)
        active = self._active(self.t)
        rewards = torch.where(active, -((actions - TARGET) ** 2).sum(dim=1), 0.0)
        self.t += 1
        return self._observation(), rewards, {}

    def _active(self, t: int) -> torch.Tensor:
        return (torch.arange(self.users) + t) % 4 != 3

    def _observation(self) -> FakeObservation:
        noise = torch.randn((self.users, N_FEATURES), generator=self.generator)
        return FakeObservation(
            states=noise + self.t,
            levels=torch.zeros(self.users, dtype=torch.long),
            active=self._active(self.t) & torch.tensor(not self.done),
            day=torch.full((self.users,), self.t // 4),
        )


def small_td3_config(**overrides) -> TD3Config:
    values = dict(
        hidden_size=32,
        batch_size=32,
        warmup_transitions=64,
        gradient_steps=40,
        updates_per_step=4,
        buffer_size=1_000,
    )
    values.update(overrides)
    return TD3Config(**values)


def fake_batch(size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn((size, N_FEATURES), generator=generator),
        "actions": torch.rand((size, FUSION_WEIGHTS), generator=generator) * 2 - 1,
        "rewards": torch.randn((size,), generator=generator),
        "next_states": torch.randn((size, N_FEATURES), generator=generator),
        "dones": (torch.rand((size,), generator=generator) < 0.3).float(),
    }


def fitted_agent(config: TD3Config | None = None, seed: int = 0) -> TD3Agent:
    agent = TD3Agent(N_FEATURES, config or small_td3_config(), seed=seed)
    agent.fit_normalizer(torch.randn((64, N_FEATURES), generator=torch.Generator().manual_seed(9)))
    return agent


# --- cross-entropy method ------------------------------------------------------------------


def test_cem_improves_toy_objective():
    target = torch.tensor([0.5, -0.3, 0.8], dtype=torch.float64)

    def objective(candidates: torch.Tensor, iteration: int) -> torch.Tensor:
        return -((candidates - target) ** 2).sum(dim=1)

    config = CEMConfig(iterations=10, population=20, elites=5)
    result = cross_entropy_search(objective, 3, config, seed=0)
    assert len(result.history) == 10
    assert result.history[-1]["mean_score"] > result.history[0]["mean_score"]
    assert result.history[-1]["std"] < result.history[0]["std"]
    assert float((result.weights - target).abs().max()) < 0.1
    assert result.best_score == max(entry["best_score"] for entry in result.history)


def test_cem_rejects_wrong_objective_output():
    def objective(candidates: torch.Tensor, iteration: int) -> torch.Tensor:
        return torch.full((candidates.shape[0],), float("nan"))

    with pytest.raises(ValueError, match="finite scores"):
        cross_entropy_search(objective, 2, CEMConfig(iterations=1, population=4, elites=2), 0)


def test_cem_config_rejects_too_many_elites():
    with pytest.raises(ValueError, match="elites"):
        CEMConfig(population=4, elites=4)


def test_episode_return_counts_active_steps_only():
    env = FakeEnv(users=4, steps=4)
    policy = FixedWeightsPolicy(TARGET + 0.5, name="offset")
    # Each user is active on 3 of the 4 steps and loses 7 * 0.25 per active step.
    value = episode_return(env, policy, torch.Generator())
    assert value == pytest.approx(-3 * 7 * 0.25)


def test_train_cem_approaches_best_weights_in_env():
    config = CEMConfig(iterations=12, population=16, elites=4)
    policy, result = train_cem(lambda seed: FakeEnv(seed=seed), seed=0, config=config)
    assert policy.action_type == "continuous"
    assert policy.weights.shape == (FUSION_WEIGHTS,)
    assert float((policy.weights - TARGET).abs().max()) < 0.15
    assert result.history[-1]["mean_score"] > result.history[0]["mean_score"]


def test_train_cem_is_deterministic():
    config = CEMConfig(iterations=2, population=4, elites=2)
    first, _ = train_cem(lambda seed: FakeEnv(seed=seed), seed=4, config=config)
    second, _ = train_cem(lambda seed: FakeEnv(seed=seed), seed=4, config=config)
    other, _ = train_cem(lambda seed: FakeEnv(seed=seed), seed=5, config=config)
    assert torch.equal(first.weights, second.weights)
    assert not torch.equal(first.weights, other.weights)


# --- TD3 -----------------------------------------------------------------------------------


def test_replay_buffer_wraps_and_samples_shapes():
    buffer = ReplayBuffer(capacity=10, n_features=N_FEATURES, action_dim=FUSION_WEIGHTS)
    for seed in range(2):
        batch = fake_batch(size=6, seed=seed)
        buffer.add(**batch)
    assert len(buffer) == 10
    # The second batch's first 4 rows went to slots 6..9 and its last 2 overwrote slots 0, 1.
    assert torch.equal(buffer.states[0], batch["states"][4])
    assert torch.equal(buffer.states[6], batch["states"][0])
    sample = buffer.sample(5, torch.Generator().manual_seed(0))
    assert sample["states"].shape == (5, N_FEATURES)
    assert sample["actions"].shape == (5, FUSION_WEIGHTS)
    assert sample["rewards"].shape == (5,)
    assert sample["next_states"].shape == (5, N_FEATURES)
    assert sample["dones"].shape == (5,)


def test_replay_buffer_rejects_empty_sample():
    buffer = ReplayBuffer(capacity=4, n_features=N_FEATURES, action_dim=FUSION_WEIGHTS)
    with pytest.raises(ValueError, match="empty replay buffer"):
        buffer.sample(2, torch.Generator())


def test_td3_update_delays_actor():
    agent = fitted_agent(small_td3_config(policy_delay=2))
    actor_before = [p.clone() for p in agent.actor.parameters()]
    first = agent.update(fake_batch(seed=1))
    assert set(first) == {"critic_loss"}
    for before, after in zip(actor_before, agent.actor.parameters(), strict=True):
        assert torch.equal(before, after)
    second = agent.update(fake_batch(seed=2))
    assert set(second) == {"critic_loss", "actor_loss"}
    changed = any(
        not torch.equal(before, after)
        for before, after in zip(actor_before, agent.actor.parameters(), strict=True)
    )
    assert changed
    assert agent.updates == 2


def test_td3_soft_update_moves_targets_by_tau():
    agent = fitted_agent(small_td3_config(policy_delay=1, tau=0.25))
    old_target = [p.clone() for p in agent.critic_target.parameters()]
    agent.update(fake_batch())
    for old, online, target in zip(
        old_target, agent.critic.parameters(), agent.critic_target.parameters(), strict=True
    ):
        torch.testing.assert_close(target, 0.75 * old + 0.25 * online.detach())


def test_td3_target_smoothing_noise_is_clipped():
    agent = fitted_agent(small_td3_config(policy_noise=5.0, noise_clip=0.3))
    states = torch.randn((2000, N_FEATURES), generator=torch.Generator().manual_seed(1))
    clean = agent.actor_target(states)
    smoothed = agent.target_actions(states)
    difference = (smoothed - clean).abs()
    assert smoothed.shape == (2000, FUSION_WEIGHTS)
    assert float(smoothed.abs().max()) <= 1.0
    assert float(difference.max()) <= 0.3 + 1e-6
    # With a noise scale far above the clip, most entries sit at the clip or the action bound.
    assert float(difference.max()) > 0.29


def test_td3_target_without_noise_is_target_actor():
    agent = fitted_agent(small_td3_config(policy_noise=0.0))
    states = torch.randn((10, N_FEATURES))
    torch.testing.assert_close(agent.target_actions(states), agent.actor_target(states))


def test_td3_targets_stop_at_terminal_transitions():
    agent = fitted_agent()
    batch = fake_batch(size=8)
    batch["dones"] = torch.tensor([1.0, 0.0] * 4)
    targets = agent.td_targets(batch)
    assert targets.shape == (8,)
    torch.testing.assert_close(targets[0::2], batch["rewards"][0::2])
    assert not torch.allclose(targets[1::2], batch["rewards"][1::2])


def test_transition_collector_waits_for_next_active_step():
    collector = _TransitionCollector(users=2, n_features=1, action_dim=1)
    active_both = torch.tensor([True, True])

    def observation(values, active):
        return FakeObservation(
            states=torch.tensor(values).unsqueeze(1),
            levels=torch.zeros(2, dtype=torch.long),
            active=active,
            day=torch.zeros(2, dtype=torch.long),
        )

    first = observation([1.0, 2.0], active_both)
    collector.record(first, torch.tensor([[0.125], [0.25]]), torch.tensor([1.0, 2.0]))
    second = observation([3.0, 4.0], torch.tensor([True, False]))
    done_now = collector.observe(second)
    assert done_now["states"].tolist() == [[1.0]]
    assert done_now["next_states"].tolist() == [[3.0]]
    assert done_now["dones"].tolist() == [0.0]
    collector.record(second, torch.tensor([[0.3], [9.9]]), torch.tensor([3.0, 9.9]))
    third = observation([5.0, 6.0], torch.tensor([False, True]))
    resumed = collector.observe(third)
    # User 1 skipped the second step: its transition from step 1 ends at step 3's state.
    assert resumed["states"].tolist() == [[2.0]]
    assert resumed["actions"].tolist() == [[0.25]]
    assert resumed["rewards"].tolist() == [2.0]
    assert resumed["next_states"].tolist() == [[6.0]]
    final = collector.finish()
    assert final["states"].tolist() == [[3.0]]
    assert final["dones"].tolist() == [1.0]
    assert collector.finish() is None


def test_train_td3_spends_budget_and_is_deterministic():
    config = small_td3_config()
    runs = [
        train_td3(lambda seed: FakeEnv(seed=seed), N_FEATURES, seed=1, config=config)
        for _ in range(2)
    ]
    (policy, result), (again, _) = runs
    assert isinstance(policy, TD3Policy)
    assert result.gradient_steps == config.gradient_steps
    assert result.transitions >= config.warmup_transitions
    assert result.episodes >= 2
    for key, value in policy.agent.actor.state_dict().items():
        assert torch.equal(value, again.agent.actor.state_dict()[key]), key
    states = torch.randn((5, N_FEATURES))
    actions = policy.act(states, torch.zeros(5, dtype=torch.long), torch.Generator())
    assert actions.shape == (5, FUSION_WEIGHTS)
    assert float(actions.abs().max()) <= 1.0


def test_train_td3_learns_fake_env_target():
    config = small_td3_config(
        hidden_size=64,
        gradient_steps=600,
        updates_per_step=20,
        warmup_transitions=200,
        actor_lr=1e-3,
        critic_lr=1e-3,
    )
    policy, _ = train_td3(lambda seed: FakeEnv(seed=seed), N_FEATURES, seed=0, config=config)
    states = FakeEnv().reset().states
    actions = policy.act(states, torch.zeros(6, dtype=torch.long), torch.Generator())
    error = (actions.mean(dim=0) - TARGET).abs().max()
    assert float(error) < 0.25


# --- the real environment ------------------------------------------------------------------

DAY_MS = 86_400_000
DAY0_MS = 1_650_816_000_000  # 2022-04-25 00:00 in UTC+8
WORLD_CLUSTERS = 4
WORLD_SETTINGS = Settings(
    data_dir=None,
    clusters=WORLD_CLUSTERS,
    levels=3,
    hidden_size=16,
    batch_size=32,
    learning_rate=0.01,
    centroids_per_level=2,
)
LOG_SIGNALS = (
    "is_click",
    "long_view",
    "is_like",
    "is_comment",
    "is_forward",
    "is_follow",
    "is_hate",
)


def world_log(users: int, days: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Log rows, video features and clusters of users who return at their own rates.

    User ``u`` is active on a day with probability between 0.3 and 0.95, so retention scores
    spread over the levels. Clicks are likelier on videos of cluster 0.
    """
    rng = np.random.default_rng(seed)
    video_ids = np.arange(500, 540)
    cluster_of = {int(video): int(video) % WORLD_CLUSTERS for video in video_ids}
    records = []
    for user in range(users):
        active_rate = 0.3 + 0.65 * user / max(users - 1, 1)
        for day in range(days):
            if rng.random() > active_rate:
                continue
            start = DAY0_MS + day * DAY_MS + int(rng.integers(9, 21)) * 3_600_000
            for request in range(int(rng.integers(1, 4))):
                video = int(rng.choice(video_ids))
                click = int(rng.random() < (0.7 if cluster_of[video] == 0 else 0.2))
                row = dict.fromkeys(LOG_SIGNALS, 0)
                row.update(is_click=click, long_view=int(click and rng.random() < 0.5))
                row.update(
                    user_id=user,
                    video_id=video,
                    time_ms=start + request * 90_000,
                    play_time_ms=7_000 if click else 400,
                    duration_ms=10_000,
                    tab=1,
                    date=20220425 + day,
                )
                records.append(row)
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
            "tag": [str(cluster_of[int(video)]) for video in video_ids],
        }
    ).astype({"video_type": "string", "upload_type": "string", "tag": "string"})
    return log, features, cluster_of


@pytest.fixture(scope="module")
def world() -> tuple[EvalDataset, UserSimulator]:
    log, features, cluster_of = world_log(users=90, days=6, seed=0)
    clusters = VideoClusters(cluster_of, clusters=WORLD_CLUSTERS)
    dataset = build_dataset(
        assign_sessions(log, WORLD_SETTINGS),
        WORLD_SETTINGS,
        clusters,
        split_day=4,
        video_features=features,
    )
    return dataset, UserSimulator.fit(dataset, seed=0, epochs=5, batch_size=64)


def world_env(world, seed: int, users: int = 12) -> RetentionEnv:
    dataset, simulator = world
    return RetentionEnv(
        simulator, dataset, WORLD_SETTINGS, users=users, seed=seed, candidates=20, max_requests=5
    )


def test_episode_return_matches_env_rollout(world):
    env = world_env(world, seed=3)
    policy = FixedWeightsPolicy(torch.tensor(DEFAULT_FUSION_WEIGHTS), name="default")
    value = episode_return(env, policy, torch.Generator())
    result = world_env(world, seed=3).rollout(policy, seed=3)
    assert value == pytest.approx(float(result.user_returns.double().mean()), rel=1e-5)


def test_collector_pairs_every_request_in_env(world):
    env = world_env(world, seed=1)
    observation = env.reset()
    collector = _TransitionCollector(env.users, observation.states.shape[1], FUSION_WEIGHTS)
    policy = RandomPolicy("continuous")
    generator = torch.Generator().manual_seed(0)
    transitions = []
    while not env.done:
        actions = policy.act(observation.states, observation.levels, generator)
        next_observation, rewards, _ = env.step(actions, "continuous")
        collector.record(observation, actions, rewards)
        transitions.append(collector.observe(next_observation))
        observation = next_observation
    transitions.append(collector.finish())
    dones = torch.cat([t["dones"] for t in transitions if t is not None])
    assert len(dones) == env.metrics()["requests"]
    assert int(dones.sum()) == env.users


def test_behaviour_policy_redraws_only_started_days():
    behaviour = BehaviourPolicy(users=4, noise_std=5.0)
    before = behaviour.weights.clone()
    behaviour.start_days(torch.tensor([False, True, False, True]), torch.Generator())
    after = behaviour.weights
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    assert not torch.equal(after[[1, 3]], before[[1, 3]])
    assert float(after.abs().max()) <= 1.0


def test_continuous_demonstrations_record_env_requests(world):
    dataset, _ = world
    envs: list[RetentionEnv] = []

    def make_env(seed: int) -> RetentionEnv:
        envs.append(world_env(world, seed=seed))
        return envs[-1]

    demos = continuous_demonstrations(make_env, WORLD_SETTINGS, seed=2, episodes=2)
    again = continuous_demonstrations(make_env, WORLD_SETTINGS, seed=2, episodes=2)
    recorded = envs[:2]
    assert demos.action_type == "continuous"
    assert demos.boundaries == tuple(dataset.level_boundaries)
    assert len(demos) == sum(env.metrics()["requests"] for env in recorded)
    # Each user-day draws its own weights and keeps them for all its requests.
    user_days = sum(env.metrics()["user_days"] for env in recorded)
    assert len(torch.unique(demos.actions, dim=0)) == user_days
    assert bool(torch.isfinite(demos.gap_days).all())
    assert float(demos.gap_days.min()) >= 1.0
    assert float(demos.actions.abs().max()) <= 1.0
    assert torch.equal(demos.expert, demos.gap_days <= 3)
    assert torch.equal(demos.states, again.states)
    assert torch.equal(demos.actions, again.actions)


def test_every_policy_rolls_out_in_env(world):
    dataset, _ = world
    demos = continuous_demonstrations(
        lambda seed: world_env(world, seed=seed), WORLD_SETTINGS, seed=0, episodes=2
    )
    variants = cloned_variants(WORLD_SETTINGS)
    policies = [
        RandomPolicy("discrete", n_clusters=WORLD_CLUSTERS),
        RandomPolicy("continuous"),
        PopularPolicy.from_dataset(dataset),
        train_cloned(dataset, WORLD_SETTINGS, seed=0, epochs=3, **variants["bc"]),
        train_cloned(dataset, WORLD_SETTINGS, seed=0, epochs=3, **variants["sec"]),
        train_cloned(
            dataset,
            WORLD_SETTINGS,
            action_type="continuous",
            demonstrations=demos,
            seed=0,
            epochs=3,
            **variants["sec_no_stratification"],
        ),
    ]
    for policy in policies:
        first = world_env(world, seed=7).rollout(policy, seed=1)
        second = world_env(world, seed=7).rollout(policy, seed=1)
        assert first.metrics == second.metrics, policy.name
        assert first.metrics["user_days"] > 0, policy.name
    shares = world_env(world, seed=7).rollout(policies[4], seed=1).metrics["level_selected"]
    assert sum(shares.values()) == pytest.approx(1.0)


def test_cem_and_td3_train_in_env(world):
    dataset, _ = world

    def make_env(seed: int) -> RetentionEnv:
        return world_env(world, seed=seed, users=8)

    cem_config = CEMConfig(iterations=2, population=3, elites=1)
    cem, cem_result = train_cem(make_env, seed=0, config=cem_config)
    cem_again, _ = train_cem(make_env, seed=0, config=cem_config)
    assert torch.equal(cem.weights, cem_again.weights)
    assert len(cem_result.history) == 2
    td3_config = small_td3_config(warmup_transitions=30, gradient_steps=20, updates_per_step=5)
    td3, td3_result = train_td3(make_env, dataset.n_features, seed=0, config=td3_config)
    assert td3_result.gradient_steps == 20
    for policy in (cem, td3):
        metrics = world_env(world, seed=7).rollout(policy, seed=1).metrics
        assert metrics["action_type"] == "continuous"
        assert metrics["user_days"] > 0
