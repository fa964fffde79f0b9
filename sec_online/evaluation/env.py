"""Batched rollouts of a recommendation policy in the fitted user simulator.

A rollout follows ``users`` test users for ``horizon_days`` days from the first test day. Every
user starts active on day 0 with the state the live ``UserStateMachine`` had after the train
days. A step is one request of every active user:

1. The policy's action becomes a slate of ``slate_size`` video rows. A discrete action is a
   distribution over clusters. Each slot samples a cluster from it, then a video from that
   cluster's pool of its 50 most popular videos on train days. A slate repeats a video only
   when the pool has fewer videos than the slots given to it. A continuous action is a weight
   vector ``w`` over the seven signals. ``candidates`` videos are drawn from the 500 most
   popular ones and scored by ``sum_j w_j * p_j(user, video)`` with the response model's
   probabilities, and the top ``slate_size`` are shown.
2. Feedback is sampled from the response model, and the slate is applied to the user's state as
   ``Impression`` events, so policies see the features the live system computes.
3. The leave model decides whether the user-day ends (it also ends at ``max_requests``). At the
   end, the return gap is sampled from the return model given the day-start state and the day's
   feedback. The user comes back ``gap`` days later with a ``Return`` event, or is done when that
   day is at or beyond ``horizon_days``. That last gap still counts in the metrics.

Reward of a user for a step (``[B]``, 0 for inactive users): the clicks, long views and likes of
the slate, minus the gap in days when the step ends the user's day. The engagement part rewards
each request, and the gap part is the retention signal.

Levels: a user's historical level is the level of their retention score under
``EvalDataset.level_boundaries``, the quantiles ``1/K .. (K-1)/K`` of the retention scores of
users after the train days, and level 0 while the user has no score. Simulated returns update the
score and the level with the same boundaries.

All sampling uses ``torch.Generator`` objects seeded from the seed, so the same seed gives the
same rollout whatever the global random state.

NOTE: logged requests show 1.04 videos on average (KuaiRand-Pure logs only its sampled videos).
With ``slate_size`` 6, simulated sessions hold about six times more impressions than logged
ones, so ``log_impressions_per_session`` leaves the range the models were fitted on and the
simulated users stay and return more than logged users do. ``slate_size=1`` keeps the states in
range; the env logs a warning when ``slate_size`` exceeds the largest logged slate.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from sec_online.evaluation.dataset import TEST, EvalDataset
from sec_online.evaluation.metrics import nuclear_norm
from sec_online.evaluation.simulator import (
    LONG_VIEW,
    UserSimulator,
    day_aggregates,
    torch_threads,
)
from sec_online.levels import level_of
from sec_online.schemas import FEEDBACK_SIGNALS, Impression, Return
from sec_online.settings import Settings
from sec_online.userstate import UserStateMachine

logger = logging.getLogger(__name__)

DISCRETE = "discrete"
CONTINUOUS = "continuous"
CLUSTER_POOL_SIZE = 50
CANDIDATE_POOL_SIZE = 500
MS_PER_DAY = 86_400_000
# Simulated requests of a user-day are this far apart. It only shifts return gaps (ms) by
# minutes, because each simulated user-day is one session.
REQUEST_INTERVAL_MS = 60_000
REWARD_SIGNALS = ("click", "long_view", "like")
REWARD_INDEX = [FEEDBACK_SIGNALS.index(name) for name in REWARD_SIGNALS]
# Policy version recorded in simulated states; boundaries of the env never change.
BOUNDARIES_VERSION = 0


class Policy(Protocol):
    """A recommendation policy that the env can roll out.

    ``action_type`` is ``"discrete"`` (``act`` returns ``[B, A]`` non-negative weights over
    clusters, normalised per row by the env) or ``"continuous"`` (``[B, 7]`` weights over the
    signal probabilities, in ``FEEDBACK_SIGNALS`` order). A policy that picks one expert per user
    may set ``last_selected_levels`` (long ``[B]``) in ``act``; rollouts then report how often
    each level was selected.
    """

    name: str
    action_type: str

    def act(
        self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return actions for states ``[B, F]`` float32 and historical levels ``[B]`` long."""
        ...


@dataclass
class Observation:
    """Input of a policy before a step, with one row per user (``B``) in every tensor.

    Attributes
    ----------
    states
        ``[B, F]`` float32 state features. A done user keeps their last state.
    levels
        ``[B]`` long historical retention levels in ``0 .. K-1``.
    active
        ``[B]`` bool, the users that make a request in the next step.
    day
        ``[B]`` long day of each user in ``0 .. horizon_days - 1`` (for done users, their
        last day).
    """

    states: torch.Tensor
    levels: torch.Tensor
    active: torch.Tensor
    day: torch.Tensor


@dataclass
class RolloutResult:
    """Outcome of one rollout.

    ``user_returns`` is ``[B]``, each user's summed rewards. ``seconds`` is wall time.
    """

    policy: str
    seed: int
    metrics: dict[str, Any]
    user_returns: torch.Tensor
    steps: int
    seconds: float


@dataclass
class _Totals:
    """Counters of one rollout, the inputs of ``RetentionEnv.metrics``."""

    gaps: list[torch.Tensor] = field(default_factory=list)
    impressions: int = 0
    requests: int = 0
    signals: torch.Tensor = field(default_factory=lambda: torch.zeros(len(FEEDBACK_SIGNALS)))
    nuclear_norms: list[float] = field(default_factory=list)
    selected_levels: torch.Tensor | None = None


class RetentionEnv:
    """Rollouts of ``users`` sampled test users in a fitted ``UserSimulator``.

    Parameters
    ----------
    simulator
        Simulator fitted on ``dataset``.
    dataset
        Dataset with the users' start states, video pools and level boundaries.
    settings
        ``levels`` and ``score_decay`` must match the dataset's.
    users
        Test users to sample (without replacement, by ``seed``).
    horizon_days
        Days each user is followed, from the first test day.
    slate_size, candidates, max_requests
        Videos per request, candidates scored for continuous actions, requests per user-day.
    seed
        Seed of the user sample, and of the rollout when ``reset`` gets none.

    Raises
    ------
    ValueError
        When an argument is out of range, there are fewer test users than ``users``, or the
        simulator, dataset and settings do not fit together.
    """

    def __init__(
        self,
        simulator: UserSimulator,
        dataset: EvalDataset,
        settings: Settings,
        *,
        users: int = 1000,
        horizon_days: int = 10,
        slate_size: int = 6,
        candidates: int = 50,
        max_requests: int = 30,
        seed: int = 0,
    ) -> None:
        _check_arguments(users, horizon_days, slate_size, candidates, max_requests)
        simulator.check_dataset(dataset)
        if settings.levels != dataset.levels:
            raise ValueError(
                f"SEC_LEVELS={settings.levels} but the dataset was built with {dataset.levels} "
                "levels; build the dataset with the same settings"
            )
        self.simulator = simulator
        self.dataset = dataset
        self.horizon_days = horizon_days
        self.slate_size = slate_size
        self.max_requests = max_requests
        self.seed = seed
        self.boundaries = list(dataset.level_boundaries)
        self.machine = UserStateMachine(
            dataset.n_clusters, dataset.cluster_of, settings.score_decay
        )
        self.user_ids = _sample_users(dataset, users, seed)
        self._offsets = _day_offsets(dataset, self.user_ids)
        self._start_ms = dataset.day0_ms + dataset.split_day * MS_PER_DAY
        self._pools, self._pool_sizes = _cluster_pools(dataset)
        self._candidate_pool = _popular_rows(dataset, CANDIDATE_POOL_SIZE)
        if candidates > len(self._candidate_pool):
            logger.warning(
                "candidates=%d exceeds the %d videos shown on train days; continuous actions "
                "score all %d",
                candidates,
                len(self._candidate_pool),
                len(self._candidate_pool),
            )
            candidates = len(self._candidate_pool)
        if slate_size > candidates:
            raise ValueError(
                f"slate_size={slate_size} exceeds the {candidates} candidates of a continuous "
                "action; lower slate_size"
            )
        self.candidates = candidates
        _warn_slate_size(dataset, slate_size)
        self._video_ids = dataset.video_ids.tolist()
        self._durations = np.rint(dataset.video_duration_ms).astype(np.int64).tolist()
        self._video_cluster = torch.as_tensor(dataset.video_cluster)
        self.reset()

    @property
    def users(self) -> int:
        """Number ``B`` of simulated users."""
        return len(self.user_ids)

    @property
    def user_states(self) -> list[dict[str, Any]]:
        """Current ``UserStateMachine`` state dict of each user, in ``user_ids`` order."""
        return self._states

    @property
    def done(self) -> bool:
        """True when every user has passed the horizon."""
        return not bool(self._active.any())

    def reset(self, seed: int | None = None) -> Observation:
        """Start a rollout: every user at day 0 with their state after the train days.

        ``seed`` seeds the env's sampling; ``None`` uses the constructor's seed.
        """
        env_seed, _ = rollout_seeds(self.seed if seed is None else seed)
        self._generator = torch.Generator().manual_seed(env_seed)
        batch, n_features = self.users, self.dataset.n_features
        self._states = [
            json.loads(json.dumps(self.dataset.user_static[user])) for user in self.user_ids
        ]
        self._features = torch.zeros(batch, n_features)
        self._day_start_features = torch.zeros(batch, n_features)
        self._levels = torch.zeros(batch, dtype=torch.long)
        self._day = torch.zeros(batch, dtype=torch.long)
        self._active = torch.ones(batch, dtype=torch.bool)
        self._request_index = torch.zeros(batch, dtype=torch.long)
        self._session_ms = [0] * batch
        self._day_requests = torch.zeros(batch)
        self._day_impressions = torch.zeros(batch)
        self._day_signals = torch.zeros(batch, len(FEEDBACK_SIGNALS))
        self._day_watch = torch.zeros(batch)
        self._clusters_shown = torch.zeros(batch, self.dataset.n_clusters, dtype=torch.bool)
        self._user_returns = torch.zeros(batch)
        self._totals = _Totals()
        self._steps = 0
        for row in range(batch):
            self._open_day(row)
        return self._observation()

    def step(
        self, actions: torch.Tensor, action_type: str | None = None
    ) -> tuple[Observation, torch.Tensor, dict[str, torch.Tensor]]:
        """Serve one request to every active user.

        Parameters
        ----------
        actions
            ``[B, A]`` cluster weights or ``[B, 7]`` signal weights; rows of inactive users are
            ignored.
        action_type
            ``"discrete"`` or ``"continuous"``; inferred from the width when ``None``, which
            needs ``A != 7``.

        Returns
        -------
        tuple
            The next observation, rewards ``[B]`` and an info dict of ``[B]`` tensors:

            - ``stepped``: bool, the user made a request in this step;
            - ``day_end``: bool, the request ended the user's day;
            - ``gap_days``: float, the sampled return gap, NaN without a day end;
            - ``done``: bool, the user passed the horizon in this step;
            - ``engagement``: clicks + long views + likes of the slate.
        """
        if self.done:
            raise RuntimeError("every user has passed the horizon; call reset() first")
        kind = self._action_type(actions, action_type)
        rows = torch.nonzero(self._active).squeeze(1)  # [b]
        chosen = actions.detach().to(torch.float32)[rows]  # [b, A] or [b, 7]
        states = self._features[rows]  # [b, F]
        if kind == DISCRETE:
            chosen = _distributions(chosen)
            slates = self._discrete_slates(chosen)
        else:
            slates = self._continuous_slates(chosen, states)
        signals, watch = self.simulator.sample_responses(states, slates, self._generator)
        feedback = signals.sum(dim=1)  # [b, 7]
        ends = self._leaves(states, feedback, rows)  # [b]
        self._record(rows, chosen, slates, feedback, watch)
        self._apply_impressions(rows, slates, signals, watch)
        engagement = feedback[:, REWARD_INDEX].sum(dim=1)  # [b]
        gaps = self._end_days(rows[ends])  # [e]
        return self._step_outputs(rows, ends, engagement, gaps)

    def metrics(self) -> dict[str, Any]:
        """Metrics of the rollout so far, as JSON values.

        ``return_time`` is the mean gap in days over simulated user-days, ``day1_retention``
        the share of gaps of 1 day. ``click_rate``, ``long_view_rate`` and ``like_rate`` are
        per shown video. ``distinct_clusters`` is the mean number of clusters shown to a user.
        ``nuclear_norm`` is the nuclear norm of the active users' action matrix, averaged over
        steps. It grows with the number of active users, which differs between policies. So
        ``nuclear_norm_first_step``, taken while every user is active, compares policies on the
        same batch. ``level_selected``
        gives the share of requests served by each level's expert, when the policy reported
        it.
        """
        totals = self._totals
        gaps = torch.cat(totals.gaps) if totals.gaps else torch.zeros(0)
        impressions = max(totals.impressions, 1)
        metrics: dict[str, Any] = {
            "return_time": float(gaps.mean()) if len(gaps) else None,
            "day1_retention": float((gaps == 1).float().mean()) if len(gaps) else None,
            "click_rate": float(totals.signals[FEEDBACK_SIGNALS.index("click")]) / impressions,
            "long_view_rate": float(totals.signals[LONG_VIEW]) / impressions,
            "like_rate": float(totals.signals[FEEDBACK_SIGNALS.index("like")]) / impressions,
            "distinct_clusters": float(self._clusters_shown.sum(dim=1).float().mean()),
            "nuclear_norm": float(np.mean(totals.nuclear_norms)) if totals.nuclear_norms else None,
            "nuclear_norm_first_step": totals.nuclear_norms[0] if totals.nuclear_norms else None,
            "user_days": len(gaps),
            "requests": totals.requests,
            "impressions": totals.impressions,
            "users": self.users,
            "requests_per_user_day": totals.requests / len(gaps) if len(gaps) else None,
            "episode_return": float(self._user_returns.mean()),
        }
        if totals.selected_levels is not None:
            counts = totals.selected_levels
            shares = (counts / counts.sum().clamp(min=1)).tolist()
            metrics["level_selected"] = {str(level): share for level, share in enumerate(shares)}
        return metrics

    def rollout(self, policy: Policy, seed: int) -> RolloutResult:
        """Reset with ``seed``, step ``policy`` until every user is done, and report metrics.

        The policy gets its own generator, seeded from ``seed`` apart from the env's.
        """
        started = time.monotonic()
        if policy.action_type not in (DISCRETE, CONTINUOUS):
            raise ValueError(
                f"policy {policy.name!r} has action_type {policy.action_type!r}, expected "
                f"{DISCRETE!r} or {CONTINUOUS!r}"
            )
        _, policy_seed = rollout_seeds(seed)
        generator = torch.Generator().manual_seed(policy_seed)
        with torch_threads(1), torch.no_grad():
            observation = self.reset(seed)
            while not self.done:
                actions = policy.act(observation.states, observation.levels, generator)
                self._count_selected_levels(policy, observation.active)
                observation, _, _ = self.step(actions, policy.action_type)
        metrics = self.metrics()
        metrics.update(policy=policy.name, action_type=policy.action_type, seed=seed)
        seconds = time.monotonic() - started
        logger.info(
            "rollout finished: policy=%s seed=%d users=%d steps=%d return_time=%s seconds=%.1f",
            policy.name,
            seed,
            self.users,
            self._steps,
            metrics["return_time"],
            seconds,
        )
        return RolloutResult(
            policy.name, seed, metrics, self._user_returns.clone(), self._steps, seconds
        )

    def _action_type(self, actions: torch.Tensor, action_type: str | None) -> str:
        width = self.dataset.n_clusters
        expected = {DISCRETE: width, CONTINUOUS: len(FEEDBACK_SIGNALS)}
        if action_type is None:
            if width == len(FEEDBACK_SIGNALS):
                raise ValueError("with 7 clusters the action type is ambiguous; pass action_type")
            action_type = DISCRETE if actions.shape[-1] == width else CONTINUOUS
        if action_type not in expected:
            raise ValueError(f"action_type must be {DISCRETE!r} or {CONTINUOUS!r}")
        if tuple(actions.shape) != (self.users, expected[action_type]):
            raise ValueError(
                f"{action_type} actions must have shape [{self.users}, {expected[action_type]}], "
                f"got {tuple(actions.shape)}"
            )
        if not torch.isfinite(actions[self._active]).all():
            raise ValueError("actions of active users must be finite")
        return action_type

    def _discrete_slates(self, probs: torch.Tensor) -> torch.Tensor:
        """Video rows ``[b, S]`` for cluster distributions ``[b, A]``."""
        size, pool = self.slate_size, self._pools.shape[1]
        available = (self._pool_sizes > 0).to(torch.float32)  # [A]
        probs = probs * available
        totals = probs.sum(dim=1, keepdim=True)
        uniform = available.expand_as(probs) / available.sum()
        probs = torch.where(totals > 0, probs / totals.clamp(min=1e-30), uniform)
        clusters = torch.multinomial(probs, size, replacement=True, generator=self._generator)
        same = clusters[:, :, None] == clusters[:, None, :]  # [b, S, S]
        earlier = torch.ones(size, size, dtype=torch.bool).tril(diagonal=-1)  # slot j < slot i
        rank = (same & earlier).sum(dim=2)  # [b, S], earlier slots with the same cluster
        first = same.to(torch.int8).argmax(dim=2)  # [b, S], first slot with the same cluster
        sizes = self._pool_sizes[clusters]  # [b, S]
        keys = torch.rand(clusters.shape[0], size, pool, generator=self._generator)
        keys = keys.masked_fill(torch.arange(pool) >= sizes[..., None], 2.0)
        # Slots with the same cluster share one random order of its pool and take successive
        # positions of it, so a slate repeats a video only when the pool is exhausted.
        keys = keys.gather(1, first[..., None].expand(-1, -1, pool))
        order = keys.argsort(dim=2)  # [b, S, pool]
        position = order.gather(2, (rank % sizes)[..., None]).squeeze(2)  # [b, S]
        return self._pools[clusters, position]

    def _continuous_slates(self, weights: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Video rows ``[b, S]``: the best of ``candidates`` popular videos by weighted score."""
        batch, pool = weights.shape[0], len(self._candidate_pool)
        keys = torch.rand(batch, pool, generator=self._generator)
        candidates = self._candidate_pool[keys.topk(self.candidates, dim=1).indices]  # [b, C]
        probs = self.simulator.response_probs(states, candidates)  # [b, C, 7]
        scores = (probs * weights[:, None, :]).sum(dim=2)  # [b, C]
        best = scores.topk(self.slate_size, dim=1).indices  # [b, S]
        return candidates.gather(1, best)

    def _leaves(
        self, states: torch.Tensor, feedback: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Decide whether each stepping user's day ends after this request, ``[b]`` bool."""
        index = self._request_index[rows]
        sizes = torch.full((len(rows),), float(self.slate_size))
        probs = self.simulator.leave_prob(states, feedback, index, sizes)
        leaves = torch.bernoulli(probs, generator=self._generator).bool()
        return leaves | (index + 1 >= self.max_requests)

    def _record(
        self,
        rows: torch.Tensor,
        actions: torch.Tensor,
        slates: torch.Tensor,
        feedback: torch.Tensor,
        watch: torch.Tensor,
    ) -> None:
        totals = self._totals
        totals.requests += len(rows)
        totals.impressions += slates.numel()
        totals.signals += feedback.sum(dim=0)
        totals.nuclear_norms.append(nuclear_norm(actions))
        self._steps += 1
        clusters = self._video_cluster[slates]  # [b, S], -1 for videos without features
        known = clusters >= 0
        user_rows = rows[:, None].expand_as(clusters)
        self._clusters_shown[user_rows[known], clusters[known]] = True
        self._day_requests[rows] += 1
        self._day_impressions[rows] += slates.shape[1]
        self._day_signals[rows] += feedback
        self._day_watch[rows] += watch.sum(dim=1)

    def _apply_impressions(
        self, rows: torch.Tensor, slates: torch.Tensor, signals: torch.Tensor, watch: torch.Tensor
    ) -> None:
        """Apply each shown video to its user's state as an ``Impression`` (Python loop)."""
        features = []
        for row, slate, slate_signals, ratios in zip(
            rows.tolist(),
            slates.tolist(),
            signals.to(torch.int64).tolist(),
            watch.tolist(),
            strict=True,
        ):
            state = self._states[row]
            time_ms = self._session_ms[row] + int(self._request_index[row]) * REQUEST_INTERVAL_MS
            for slot, (video_row, values, ratio) in enumerate(
                zip(slate, slate_signals, ratios, strict=True)
            ):
                event = self._impression(row, time_ms, slot, video_row, values, ratio)
                state = self.machine.apply_impression(state, event).state
            self._states[row] = state
            features.append(self.machine.features(state))
        if features:
            self._features[rows] = torch.tensor(features, dtype=torch.float32)

    def _impression(
        self, row: int, time_ms: int, slot: int, video_row: int, signals: list[int], ratio: float
    ) -> Impression:
        user_id = int(self.user_ids[row])
        duration = max(self._durations[video_row], 1)
        return Impression(
            event_id=f"sim:{user_id}:{time_ms}:{slot}",
            user_id=user_id,
            video_id=self._video_ids[video_row],
            time_ms=time_ms,
            session_id=self._session_ms[row],
            click=signals[0],
            long_view=signals[1],
            like=signals[2],
            comment=signals[3],
            forward=signals[4],
            follow=signals[5],
            hate=signals[6],
            play_time_ms=int(round(ratio * duration)),
            duration_ms=duration,
            tab=0,  # the simulator has no app tabs
        )

    def _end_days(self, rows: torch.Tensor) -> torch.Tensor:
        """Sample the gaps ``[e]`` of the users whose day ends, and start their next day."""
        if len(rows) == 0:
            return torch.zeros(0)
        aggregates = day_aggregates(
            self._day_requests[rows],
            self._day_impressions[rows],
            self._day_signals[rows],
            self._day_watch[rows],
        )
        probs = self.simulator.return_distribution(self._day_start_features[rows], aggregates)
        gaps = torch.multinomial(probs, 1, generator=self._generator).squeeze(1) + 1  # [e]
        self._totals.gaps.append(gaps.to(torch.float32))
        self._day[rows] += gaps
        for row, gap in zip(rows.tolist(), gaps.tolist(), strict=True):
            if int(self._day[row]) >= self.horizon_days:
                self._active[row] = False
                self._day[row] -= gap  # a done user keeps the day of their last request
            else:
                self._open_day(row)
        return gaps.to(torch.float32)

    def _open_day(self, row: int) -> None:
        """Apply the ``Return`` that opens the user's day and reset the day's counters."""
        user_id = int(self.user_ids[row])
        start = self._start_ms + int(self._day[row]) * MS_PER_DAY + self._offsets[row]
        state = self._states[row]
        previous = _open_session(state)
        event = Return(
            event_id=f"sim-return:{user_id}:{start}",
            user_id=user_id,
            time_ms=start,
            session_id=start,
            previous_session_id=previous[0] if previous else None,
            previous_session_impressions=previous[1] if previous else 0,
            gap_ms=start - previous[2] if previous else None,
        )
        state = self.machine.apply_return(state, event, self.boundaries, BOUNDARIES_VERSION).state
        self._states[row] = state
        self._session_ms[row] = start
        self._request_index[row] = 0
        features = torch.tensor(self.machine.features(state))
        self._features[row] = features
        self._day_start_features[row] = features
        score = state["retention_score"]
        self._levels[row] = level_of(score, self.boundaries) if score is not None else 0
        self._day_requests[row] = 0
        self._day_impressions[row] = 0
        self._day_signals[row] = 0
        self._day_watch[row] = 0

    def _step_outputs(
        self, rows: torch.Tensor, ends: torch.Tensor, engagement: torch.Tensor, gaps: torch.Tensor
    ) -> tuple[Observation, torch.Tensor, dict[str, torch.Tensor]]:
        batch = self.users
        continuing = rows[~ends]
        self._request_index[continuing] += 1
        rewards = torch.zeros(batch)
        rewards[rows] = engagement
        rewards[rows[ends]] -= gaps
        self._user_returns += rewards
        stepped = torch.zeros(batch, dtype=torch.bool)
        stepped[rows] = True
        day_end = torch.zeros(batch, dtype=torch.bool)
        day_end[rows[ends]] = True
        gap_days = torch.full((batch,), float("nan"))
        gap_days[rows[ends]] = gaps
        info = {
            "stepped": stepped,
            "day_end": day_end,
            "gap_days": gap_days,
            "done": stepped & ~self._active,
            "engagement": torch.zeros(batch).index_put((rows,), engagement),
        }
        return self._observation(), rewards, info

    def _observation(self) -> Observation:
        return Observation(
            states=self._features.clone(),
            levels=self._levels.clone(),
            active=self._active.clone(),
            day=self._day.clone(),
        )

    def _count_selected_levels(self, policy: Policy, active: torch.Tensor) -> None:
        selected = getattr(policy, "last_selected_levels", None)
        if selected is None:
            return
        levels = torch.as_tensor(selected).long()[active]
        counts = torch.bincount(levels, minlength=self.dataset.levels).to(torch.float32)
        previous = self._totals.selected_levels
        self._totals.selected_levels = counts if previous is None else previous + counts


def rollout_seeds(seed: int) -> tuple[int, int]:
    """Seeds of the env's and the policy's generators, derived from one rollout seed."""
    env_seed, policy_seed = np.random.SeedSequence(seed).generate_state(2).tolist()
    return int(env_seed), int(policy_seed)


def _distributions(weights: torch.Tensor) -> torch.Tensor:
    """Check discrete actions ``[b, A]`` and return them normalised per row."""
    if (weights < 0).any():
        raise ValueError("discrete actions must be non-negative cluster weights")
    totals = weights.sum(dim=1, keepdim=True)
    if (totals <= 0).any():
        raise ValueError("every active user's discrete action must have a positive sum")
    return weights / totals


def _open_session(state: dict[str, Any]) -> tuple[int, int, int] | None:
    """Find the user's latest open session: (session id, impressions, last request ms)."""
    if not state["open"]:
        return None
    key = max(state["open"], key=int)
    session = state["open"][key]
    return int(key), int(session["impressions"]), int(session["last_ms"])


def _sample_users(dataset: EvalDataset, users: int, seed: int) -> np.ndarray:
    candidates = dataset.test_users()
    if users > len(candidates):
        raise ValueError(
            f"users={users} exceeds the {len(candidates)} users active on test days; lower users"
        )
    chosen = np.random.default_rng(seed).choice(candidates, size=users, replace=False)
    return np.sort(chosen)


def _day_offsets(dataset: EvalDataset, user_ids: np.ndarray) -> list[int]:
    """Time of day (ms after local midnight) of each user's first logged test-day request.

    Simulated days of a user start at that time, so the first return gap after the train days
    keeps the user's own rhythm.
    """
    days = dataset.days
    test = days.loc[days["split"] == TEST].drop_duplicates("user_id").set_index("user_id")
    day_start = dataset.day0_ms + test["day"].to_numpy() * MS_PER_DAY
    offsets = dict(
        zip(test.index.tolist(), (test["start_ms"].to_numpy() - day_start).tolist(), strict=True)
    )
    return [int(offsets[int(user)]) for user in user_ids]


def _cluster_pools(dataset: EvalDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Pools ``[A, 50]`` of video rows per cluster, most popular first, and pool sizes ``[A]``.

    A pool contains the cluster's videos shown on train days. A cluster without such a video uses
    its first videos by id, which the response model knows only from their features, and a
    cluster without any video has an empty pool that slates never draw from.
    """
    pools = torch.zeros(dataset.n_clusters, CLUSTER_POOL_SIZE, dtype=torch.long)
    sizes = torch.zeros(dataset.n_clusters, dtype=torch.long)
    popularity = dataset.video_popularity
    for cluster in range(dataset.n_clusters):
        members = np.flatnonzero(dataset.video_cluster == cluster)
        shown = members[popularity[members] > 0]
        if len(shown):
            members = shown[np.argsort(-popularity[shown], kind="stable")]
        members = members[:CLUSTER_POOL_SIZE]
        pools[cluster, : len(members)] = torch.as_tensor(members)
        sizes[cluster] = len(members)
    if int(sizes.sum()) == 0:
        raise ValueError("no cluster has a video; check the video clusters of the dataset")
    return pools, sizes


def _popular_rows(dataset: EvalDataset, count: int) -> torch.Tensor:
    """Rows of the ``count`` most popular train-day videos (fewer when fewer were shown)."""
    shown = np.flatnonzero(dataset.video_popularity > 0)
    ranked = shown[np.argsort(-dataset.video_popularity[shown], kind="stable")]
    return torch.as_tensor(ranked[:count], dtype=torch.long)


def _warn_slate_size(dataset: EvalDataset, slate_size: int) -> None:
    if "slate_size" not in dataset.requests or dataset.requests.empty:
        return
    largest = int(dataset.requests["slate_size"].max())
    if slate_size > largest:
        logger.warning(
            "slate_size=%d exceeds the largest logged slate size %d (mean %.2f videos): "
            "simulated states such as log_impressions_per_session grow beyond the range the "
            "simulator was fitted on",
            slate_size,
            largest,
            float(dataset.requests["slate_size"].mean()),
        )


def _check_arguments(
    users: int, horizon_days: int, slate_size: int, candidates: int, max_requests: int
) -> None:
    for name, value in (
        ("users", users),
        ("horizon_days", horizon_days),
        ("slate_size", slate_size),
        ("candidates", candidates),
        ("max_requests", max_requests),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
