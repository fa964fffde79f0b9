"""Reinforcement-learning baselines with continuous actions: CEM and TD3.

Both learn fusion weights ``[7]`` in ``[-1, 1]`` (see ``sec_online.evaluation.policies``) by
interacting with a training environment, which the caller must build on other users or another
seed than the evaluation. The environment is anything with ``reset() -> Observation``,
``step(actions, "continuous") -> (Observation, rewards [B], info)`` and ``done``, as
``RetentionEnv`` has. Its reward per request is the slate's clicks, long views and likes, minus
the return gap in days at the last request of a user-day.

- :func:`train_cem`: the cross-entropy method over one state-independent weight vector, which
  maximises the mean episode return per user.
- :func:`train_td3`: TD3 (Fujimoto, van Hoof and Meger, "Addressing Function Approximation Error
  in Actor-Critic Methods", ICML 2018) with a state-dependent actor.

RLUR (Cai et al., "Reinforcing User Retention in a Billion Scale Short Video Recommender
System", 2023) is not implemented.

Every trainer draws from its own ``torch.Generator`` and seeds network initialisation locally,
so the same seed and environment give the same policy, whatever the global RNG state.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sec_online.evaluation.policies import FUSION_WEIGHTS, FixedWeightsPolicy
from sec_online.evaluation.simulator import torch_threads
from sec_online.model import FeatureNormalizer

__all__ = [
    "CEMConfig",
    "CEMResult",
    "ReplayBuffer",
    "TD3Agent",
    "TD3Config",
    "TD3Policy",
    "episode_return",
    "train_cem",
    "train_td3",
]

logger = logging.getLogger(__name__)

MAX_ACTION = 1.0


class TrainingEnv(Protocol):
    """The part of ``RetentionEnv`` the trainers use."""

    def reset(self) -> Any: ...

    def step(
        self, actions: torch.Tensor, action_type: str | None = None
    ) -> tuple[Any, torch.Tensor, dict[str, Any]]: ...

    @property
    def done(self) -> bool: ...


# ---------------------------------------------------------------------------------------------
# Cross-entropy method
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CEMConfig:
    """Budget and search distribution of the cross-entropy method.

    The defaults (5 iterations of 8 candidates) cost 40 episodes of the training environment.
    On the shipped log, with episodes of 48 users, that took 42 s on a busy 2-core machine.
    The time grows about linearly with the users per episode.

    Attributes
    ----------
    iterations
        Rounds of sampling, evaluation and refitting.
    population
        Candidate weight vectors evaluated per iteration.
    elites
        Best candidates that the Gaussian is refitted to, fewer than ``population``.
    initial_std
        Standard deviation of the first Gaussian around a zero mean, per weight.
    extra_std
        Standard deviation added to the refitted one, shrinking linearly to 0 at the last
        iteration, which keeps the search from collapsing on a few noisy evaluations (the
        decreasing noise of Szita and Lorincz, "Learning Tetris Using the Noisy Cross-Entropy
        Method", 2006).
    """

    iterations: int = 5
    population: int = 8
    elites: int = 2
    initial_std: float = 0.5
    extra_std: float = 0.1

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.population < 2:
            raise ValueError(
                f"CEM needs iterations >= 1 and population >= 2, got {self.iterations} "
                f"and {self.population}"
            )
        if not 1 <= self.elites < self.population:
            raise ValueError(
                f"elites must be in [1, population={self.population}), got {self.elites}"
            )
        if self.initial_std <= 0 or self.extra_std < 0:
            raise ValueError("initial_std must be positive and extra_std not negative")


@dataclass
class CEMResult:
    """Outcome of :func:`train_cem`.

    Attributes
    ----------
    weights
        Final mean of the search distribution, ``[D]``, clipped to ``[-1, 1]``.
    best_weights
        The best candidate evaluated, ``[D]``.
    best_score
        Its objective value.
    history
        Per iteration: ``mean_score`` and ``elite_score`` (means over the population and the
        elites), ``best_score`` and ``std`` (mean search standard deviation afterwards).
    """

    weights: torch.Tensor
    best_weights: torch.Tensor
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)


def cross_entropy_search(
    objective: Callable[[torch.Tensor, int], torch.Tensor],
    dim: int,
    config: CEMConfig,
    seed: int,
) -> CEMResult:
    """Maximise ``objective`` over vectors in ``[-1, 1]^dim`` with the cross-entropy method.

    Parameters
    ----------
    objective
        Called as ``objective(candidates [P, dim], iteration)``, returns scores ``[P]``, higher
        is better. The iteration lets it evaluate all candidates of a round on the same
        episodes (common random numbers), which ranks them with less noise.
    dim
        Length of the vector.
    config
        Budget and search distribution.
    seed
        Seed of the candidate draws.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = torch.zeros(dim, dtype=torch.float64)
    std = torch.full((dim,), config.initial_std, dtype=torch.float64)
    result = CEMResult(mean.clone(), mean.clone(), -math.inf)
    for iteration in range(config.iterations):
        noise = torch.randn((config.population, dim), generator=generator, dtype=torch.float64)
        candidates = (mean + std * noise).clamp(-MAX_ACTION, MAX_ACTION)  # [P, D]
        scores = torch.as_tensor(objective(candidates, iteration), dtype=torch.float64)
        _check_scores(scores, config.population)
        elite = candidates[scores.topk(config.elites).indices]  # [E, D]
        shrink = 1.0 - iteration / max(config.iterations - 1, 1)
        mean = elite.mean(dim=0)
        std = elite.std(dim=0, correction=0) + config.extra_std * shrink
        _record(result, candidates, scores, config.elites, std)
    result.weights = mean.clamp(-MAX_ACTION, MAX_ACTION)
    return result


def _check_scores(scores: torch.Tensor, population: int) -> None:
    if scores.shape != (population,) or not bool(torch.isfinite(scores).all()):
        raise ValueError(
            f"the CEM objective must return {population} finite scores, got {scores.tolist()}"
        )


def _record(
    result: CEMResult,
    candidates: torch.Tensor,
    scores: torch.Tensor,
    elites: int,
    std: torch.Tensor,
) -> None:
    best = int(scores.argmax())
    if float(scores[best]) > result.best_score:
        result.best_score = float(scores[best])
        result.best_weights = candidates[best].clone()
    result.history.append(
        {
            "mean_score": float(scores.mean()),
            "elite_score": float(scores.topk(elites).values.mean()),
            "best_score": float(scores[best]),
            "std": float(std.mean()),
        }
    )


@torch.no_grad()
def episode_return(env: TrainingEnv, policy: Any, generator: torch.Generator) -> float:
    """Run one episode from ``env.reset()`` and return the mean over users of summed rewards.

    A user's reward counts at the steps where the user is active, so the mean covers the
    engagement of every request and the return gap of every user-day. For ``RetentionEnv`` it
    equals ``RolloutResult.user_returns.mean()`` of the same episode.
    """
    observation = env.reset()
    users = int(observation.states.shape[0])
    total = torch.zeros(users, dtype=torch.float64)
    while not env.done:
        actions = policy.act(observation.states, observation.levels, generator)
        next_observation, rewards, _ = env.step(actions, policy.action_type)
        total += torch.where(observation.active, rewards.to(torch.float64), 0.0)
        observation = next_observation
    return float(total.mean())


def train_cem(
    make_env: Callable[[int], TrainingEnv],
    *,
    seed: int,
    config: CEMConfig | None = None,
    name: str = "cem",
) -> tuple[FixedWeightsPolicy, CEMResult]:
    """Search one fusion weight vector for all users with the cross-entropy method.

    The objective of a candidate is :func:`episode_return` in ``make_env(episode_seed)``, where
    all candidates of iteration ``i`` share ``episode_seed = seed * 1000 + i``. The policy
    returned is the final mean of the search distribution, not the luckiest candidate.

    Parameters
    ----------
    make_env
        Builds a training environment whose episodes depend only on the given seed. Build it on
        training users, never on the evaluation users and seeds.
    seed
        Seed of the candidate draws and of the episode seeds.
    config
        Budget; ``CEMConfig()`` when ``None``.
    """
    config = config or CEMConfig()
    started = time.monotonic()

    def objective(candidates: torch.Tensor, iteration: int) -> torch.Tensor:
        episode_seed = seed * 1000 + iteration
        env = make_env(episode_seed)
        scores = []
        for row in candidates:
            policy = FixedWeightsPolicy(row.to(torch.float32), name=f"{name}-candidate")
            generator = torch.Generator().manual_seed(episode_seed)
            scores.append(episode_return(env, policy, generator))
        return torch.tensor(scores, dtype=torch.float64)

    with torch_threads(1):
        result = cross_entropy_search(objective, FUSION_WEIGHTS, config, seed)
    logger.info(
        "trained CEM: seed=%d episodes=%d seconds=%.1f first_mean=%.3f last_mean=%.3f weights=%s",
        seed,
        config.iterations * config.population,
        time.monotonic() - started,
        result.history[0]["mean_score"],
        result.history[-1]["mean_score"],
        [round(value, 3) for value in result.weights.tolist()],
    )
    return FixedWeightsPolicy(result.weights.to(torch.float32), name=name), result


# ---------------------------------------------------------------------------------------------
# TD3
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TD3Config:
    """Hyperparameters and budget of TD3.

    None of the values were tuned on the simulator. The discount is lower than the 0.99 common
    in control benchmarks because one step here is one request: with 0.9, the return gap at the end
    of a user-day still weighs about 0.35 at a request ten steps earlier, while the rewards of
    later days fade. With the defaults, training on the shipped log with episodes of 256 users
    took about 45 s on a busy 2-core machine (two episodes, 22,600 transitions).

    Attributes
    ----------
    hidden_size
        Width of the two hidden layers of the actor and of each critic.
    discount
        Discount per step (request).
    tau
        Rate of the soft (Polyak) update of the target networks.
    actor_lr, critic_lr
        Adam learning rates.
    batch_size
        Transitions per gradient step.
    policy_noise, noise_clip
        Target policy smoothing: Gaussian noise of this standard deviation, clipped to
        ``±noise_clip``, is added to the target actor's actions.
    policy_delay
        The actor and the target networks are updated once every this many critic updates.
    exploration_noise
        Standard deviation of the Gaussian noise added to the actor's actions while collecting.
    warmup_transitions
        Transitions collected with uniform random actions before the first update.
    gradient_steps
        Critic updates in total: the training budget.
    updates_per_step
        Critic updates after each batched environment step once warm-up is over.
    buffer_size
        Capacity of the replay buffer; the oldest transitions are overwritten.
    """

    hidden_size: int = 256
    discount: float = 0.9
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    batch_size: int = 256
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_delay: int = 2
    exploration_noise: float = 0.1
    warmup_transitions: int = 5_000
    gradient_steps: int = 3_000
    updates_per_step: int = 8
    buffer_size: int = 200_000

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.discount < 1, "discount must be in [0, 1)"),
            (0 < self.tau <= 1, "tau must be in (0, 1]"),
            (self.policy_delay >= 1, "policy_delay must be at least 1"),
            (self.batch_size >= 1 and self.buffer_size >= self.batch_size, "buffer too small"),
            (self.gradient_steps >= 1 and self.updates_per_step >= 1, "no gradient step"),
            (min(self.policy_noise, self.noise_clip, self.exploration_noise) >= 0, "noise < 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid TD3 config: {message} ({self})")


class ReplayBuffer:
    """Ring buffer of transitions ``(state, action, reward, next_state, done)``.

    Parameters
    ----------
    capacity
        Maximum number of transitions kept.
    n_features
        Width ``F`` of the states.
    action_dim
        Width of the actions.
    """

    def __init__(self, capacity: int, n_features: int, action_dim: int) -> None:
        self.capacity = capacity
        self.states = torch.zeros(capacity, n_features)
        self.actions = torch.zeros(capacity, action_dim)
        self.rewards = torch.zeros(capacity)
        self.next_states = torch.zeros(capacity, n_features)
        self.dones = torch.zeros(capacity)
        self._next = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_states: torch.Tensor,
        dones: torch.Tensor,
    ) -> None:
        """Append ``n`` transitions, shapes ``[n, F]``, ``[n, D]``, ``[n]``, ``[n, F]``, ``[n]``."""
        n = states.shape[0]
        sizes = {tensor.shape[0] for tensor in (actions, rewards, next_states, dones)}
        if sizes != {n}:
            raise ValueError(
                f"transition tensors must share their first dimension, got {n} and {sizes}"
            )
        slots = (torch.arange(n) + self._next) % self.capacity
        self.states[slots] = states.to(torch.float32)
        self.actions[slots] = actions.to(torch.float32)
        self.rewards[slots] = rewards.to(torch.float32)
        self.next_states[slots] = next_states.to(torch.float32)
        self.dones[slots] = dones.to(torch.float32)
        self._next = int((self._next + n) % self.capacity)
        self._size = min(self._size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw ``batch_size`` transitions uniformly with replacement."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        index = torch.randint(self._size, (batch_size,), generator=generator)
        return {
            "states": self.states[index],
            "actions": self.actions[index],
            "rewards": self.rewards[index],
            "next_states": self.next_states[index],
            "dones": self.dones[index],
        }


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, outputs),
    )


class Actor(nn.Module):
    """Deterministic policy: normalised state ``[B, F]`` to action ``[B, D]`` in ``[-1, 1]``."""

    def __init__(self, n_features: int, action_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.net = _mlp(n_features, hidden_size, action_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return MAX_ACTION * torch.tanh(self.net(states))


class TwinCritic(nn.Module):
    """Two independent Q networks ``Q1, Q2(s, a)``, each ``[B]``."""

    def __init__(self, n_features: int, action_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.q1 = _mlp(n_features + action_dim, hidden_size, 1)
        self.q2 = _mlp(n_features + action_dim, hidden_size, 1)

    def forward(
        self, states: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.cat([states, actions], dim=1)  # [B, F + D]
        return self.q1(inputs).squeeze(1), self.q2(inputs).squeeze(1)


class TD3Agent:
    """Actor, twin critics, their target copies and optimisers, with the TD3 update.

    States are standardised by a :class:`~sec_online.model.FeatureNormalizer` that the caller
    fits once (:meth:`fit_normalizer`) before the first update and that stays frozen after, so
    the critics' inputs do not drift under them.

    Parameters
    ----------
    n_features
        Width ``F`` of the states.
    config
        Hyperparameters.
    seed
        Seed of the network initialisation and of every draw of :meth:`update`.
    action_dim
        Width of the actions, the 7 fusion weights by default.
    """

    def __init__(
        self, n_features: int, config: TD3Config, seed: int, action_dim: int = FUSION_WEIGHTS
    ) -> None:
        self.config = config
        self.action_dim = action_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.normalizer = FeatureNormalizer(n_features)
            self.actor = Actor(n_features, action_dim, config.hidden_size)
            self.critic = TwinCritic(n_features, action_dim, config.hidden_size)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        for module in (self.actor_target, self.critic_target):
            module.requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    def fit_normalizer(self, states: torch.Tensor) -> None:
        """Set the state normaliser's statistics from a batch ``[N, F]`` of collected states."""
        self.normalizer.observe(states)

    @torch.no_grad()
    def act(self, states: torch.Tensor, exploration_noise: float = 0.0) -> torch.Tensor:
        """Return the actor's actions ``[B, D]``, plus clipped Gaussian noise when exploring."""
        actions = self.actor(self.normalizer(states))
        if exploration_noise > 0:
            noise = torch.randn(actions.shape, generator=self.generator) * exploration_noise
            actions = (actions + noise).clamp(-MAX_ACTION, MAX_ACTION)
        return actions

    @torch.no_grad()
    def target_actions(self, next_states: torch.Tensor) -> torch.Tensor:
        """Target policy smoothing: target actor plus clipped noise, clipped to the action box.

        ``next_states`` are already normalised, shape ``[B, F]``; the result is ``[B, D]``.
        """
        noise = torch.randn((next_states.shape[0], self.action_dim), generator=self.generator)
        noise = (noise * self.config.policy_noise).clamp(
            -self.config.noise_clip, self.config.noise_clip
        )
        return (self.actor_target(next_states) + noise).clamp(-MAX_ACTION, MAX_ACTION)

    @torch.no_grad()
    def td_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Clipped double-Q targets ``r + discount * (1 - done) * min(Q1', Q2')``, ``[B]``."""
        next_states = self.normalizer(batch["next_states"])
        next_q1, next_q2 = self.critic_target(next_states, self.target_actions(next_states))
        bootstrap = (1.0 - batch["dones"]) * self.config.discount * torch.minimum(next_q1, next_q2)
        return batch["rewards"] + bootstrap

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Take one critic step and, every ``policy_delay`` steps, an actor and target step.

        Returns
        -------
        dict[str, float]
            ``critic_loss``, and ``actor_loss`` when the actor was updated.
        """
        states = self.normalizer(batch["states"])
        targets = self.td_targets(batch)
        q1, q2 = self.critic(states, batch["actions"])
        critic_loss = F.mse_loss(q1, targets) + F.mse_loss(q2, targets)
        _checked_step(self.critic_optimizer, critic_loss, "critic", self.updates)
        self.updates += 1
        losses = {"critic_loss": float(critic_loss.detach())}
        if self.updates % self.config.policy_delay == 0:
            actor_loss = -self.critic(states, self.actor(states))[0].mean()
            _checked_step(self.actor_optimizer, actor_loss, "actor", self.updates)
            self._soft_update()
            losses["actor_loss"] = float(actor_loss.detach())
        return losses

    @torch.no_grad()
    def _soft_update(self) -> None:
        tau = self.config.tau
        pairs = ((self.actor, self.actor_target), (self.critic, self.critic_target))
        for online, target in pairs:
            for param, target_param in zip(online.parameters(), target.parameters(), strict=True):
                target_param.lerp_(param, tau)


def _checked_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, which: str, update: int
) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"TD3 {which} loss is {value} at update {update + 1}; lower the learning rates or "
            "check the rewards and states for extreme values"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class TD3Policy:
    """The trained TD3 actor as an evaluation policy (no exploration noise)."""

    action_type = "continuous"

    def __init__(self, agent: TD3Agent, name: str = "td3") -> None:
        self.name = name
        self.agent = agent

    def act(
        self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return the actor's fusion weights ``[B, 7]``; ``levels`` and ``generator`` are unused."""
        return self.agent.act(states)


class _TransitionCollector:
    """Pairs each active user's step with the next observation in which the user is active.

    A user inactive after a step is between user-days or finished. The transition waits until
    the user is active again, and whatever still waits when the episode ends is terminal
    (``done = 1``): those users have no request left within the horizon.
    """

    def __init__(self, users: int, n_features: int, action_dim: int) -> None:
        self.pending = torch.zeros(users, dtype=torch.bool)
        self.states = torch.zeros(users, n_features)
        self.actions = torch.zeros(users, action_dim)
        self.rewards = torch.zeros(users)

    def observe(self, observation: Any) -> dict[str, torch.Tensor] | None:
        """Complete the pending transitions of users active in ``observation``."""
        ready = self.pending & observation.active
        if not bool(ready.any()):
            return None
        self.pending &= ~ready
        return self._transitions(ready, observation.states[ready], done=0.0)

    def record(self, observation: Any, actions: torch.Tensor, rewards: torch.Tensor) -> None:
        """Start a transition for every user active in ``observation``."""
        active = observation.active
        self.states[active] = observation.states[active].to(torch.float32)
        self.actions[active] = actions[active].to(torch.float32)
        self.rewards[active] = rewards[active].to(torch.float32)
        self.pending |= active

    def finish(self) -> dict[str, torch.Tensor] | None:
        """Close every pending transition as terminal."""
        ready = self.pending.clone()
        if not bool(ready.any()):
            return None
        self.pending[:] = False
        return self._transitions(ready, self.states[ready], done=1.0)

    def _transitions(
        self, ready: torch.Tensor, next_states: torch.Tensor, done: float
    ) -> dict[str, torch.Tensor]:
        count = int(ready.sum())
        return {
            "states": self.states[ready],
            "actions": self.actions[ready],
            "rewards": self.rewards[ready],
            "next_states": next_states,
            "dones": torch.full((count,), done),
        }


@dataclass
class TD3Result:
    """Training record of :func:`train_td3`: settings, counts and per-episode returns."""

    config: dict[str, Any]
    gradient_steps: int = 0
    transitions: int = 0
    episodes: int = 0
    episode_returns: list[float] = field(default_factory=list)
    critic_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_td3(
    make_env: Callable[[int], TrainingEnv],
    n_features: int,
    *,
    seed: int,
    config: TD3Config | None = None,
    name: str = "td3",
) -> tuple[TD3Policy, TD3Result]:
    """Train TD3 on episodes of ``make_env(seed * 1000 + episode)`` until the update budget.

    Steps:

    1. Collect with uniform random actions in ``[-1, 1]`` until the buffer holds
       ``warmup_transitions``, then fit the state normaliser on the buffer's states.
    2. Collect with the actor plus ``exploration_noise``, taking ``updates_per_step`` updates
       after each batched environment step, until ``gradient_steps`` updates are done. An
       episode that ends starts the next one on a new seed.

    Parameters
    ----------
    make_env
        Builds a training environment whose episodes depend only on the given seed. Build it on
        training users, never on the evaluation users and seeds.
    n_features
        Width ``F`` of the observed states.
    seed
        Seed of the networks, the noise, the replay sampling and the episode seeds.
    config
        Hyperparameters; ``TD3Config()`` when ``None``.
    """
    config = config or TD3Config()
    agent = TD3Agent(n_features, config, seed)
    buffer = ReplayBuffer(config.buffer_size, n_features, FUSION_WEIGHTS)
    result = TD3Result(config=asdict(config))
    started = time.monotonic()
    with torch_threads(1):
        while agent.updates < config.gradient_steps:
            _run_td3_episode(make_env(seed * 1000 + result.episodes), agent, buffer, result)
    result.seconds = time.monotonic() - started
    logger.info(
        "trained TD3: seed=%d episodes=%d transitions=%d gradient_steps=%d seconds=%.1f "
        "episode_returns=%s",
        seed,
        result.episodes,
        result.transitions,
        result.gradient_steps,
        result.seconds,
        [round(value, 3) for value in result.episode_returns],
    )
    return TD3Policy(agent, name=name), result


def _run_td3_episode(
    env: TrainingEnv, agent: TD3Agent, buffer: ReplayBuffer, result: TD3Result
) -> None:
    """Collect and train through one episode, or until the update budget is spent."""
    config = agent.config
    observation = env.reset()
    users = int(observation.states.shape[0])
    collector = _TransitionCollector(users, agent.normalizer.n_features, agent.action_dim)
    total = torch.zeros(users, dtype=torch.float64)
    transitions_before = result.transitions
    while not env.done and agent.updates < config.gradient_steps:
        actions = _collect_actions(agent, buffer, observation.states)
        next_observation, rewards, _ = env.step(actions, "continuous")
        total += torch.where(observation.active, rewards.to(torch.float64), 0.0)
        collector.record(observation, actions, rewards)
        _store(buffer, collector.observe(next_observation), result)
        observation = next_observation
        _train_after_step(agent, buffer, result)
    if env.done:
        # Only a finished episode ends the pending transitions; at the budget's end they are
        # dropped, because the users still had requests ahead.
        _store(buffer, collector.finish(), result)
        result.episode_returns.append(float(total.mean()))
    result.episodes += 1
    if result.transitions == transitions_before and agent.updates < config.gradient_steps:
        raise ValueError(
            "a TD3 training episode produced no transition, so training cannot progress; "
            "check that the environment has active users after reset()"
        )


def _collect_actions(agent: TD3Agent, buffer: ReplayBuffer, states: torch.Tensor) -> torch.Tensor:
    if agent.updates == 0 and len(buffer) < agent.config.warmup_transitions:
        shape = (states.shape[0], agent.action_dim)
        return torch.rand(shape, generator=agent.generator) * 2 * MAX_ACTION - MAX_ACTION
    return agent.act(states, agent.config.exploration_noise)


def _store(
    buffer: ReplayBuffer, transitions: dict[str, torch.Tensor] | None, result: TD3Result
) -> None:
    if transitions is None:
        return
    buffer.add(**transitions)
    result.transitions += int(transitions["states"].shape[0])


def _train_after_step(agent: TD3Agent, buffer: ReplayBuffer, result: TD3Result) -> None:
    config = agent.config
    if agent.updates == 0 and len(buffer) < max(config.warmup_transitions, 1):
        return
    if agent.updates == 0:
        agent.fit_normalizer(buffer.states[: len(buffer)])
    for _ in range(min(config.updates_per_step, config.gradient_steps - agent.updates)):
        losses = agent.update(buffer.sample(config.batch_size, agent.generator))
        result.critic_losses.append(losses["critic_loss"])
    result.gradient_steps = agent.updates
