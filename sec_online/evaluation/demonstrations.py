"""Demonstrations for cloning the level experts offline: logged user-days and simulated requests.

A demonstration row is a user state, the action taken in it, the return gap that followed and
the user's retention level at the time. Rows come from two sources:

- **discrete**: logged user-days of the train days. The state is the user's feature vector at
  the day's first request and the action is the day's distribution over video clusters, weighted
  as the live system weights a session's actions.
- **continuous**: requests of a behaviour policy rolled out in the simulator. The action is the
  7-dim fusion weight vector that ranked the request's candidates, and the gap is the one that
  ended the request's user-day.

**Experts** are rows whose user-day was followed by a return within ``EXPERT_MAX_GAP_DAYS``
days. A censored user-day, whose next return falls outside the log, is never an expert. SEC
clones experts only, while behaviour cloning of all users clones every row.

**Levels** split the rows by the user's retention score at the start of the user-day, the
``retention_score`` state feature, which the live system also uses for a user's historical
level. The boundaries are those of the dataset (``EvalDataset.level_boundaries``, quantiles of
the users' scores after the train days), which the environment also uses for the historical
level it passes to policies, so head ``k`` learns from the users it will serve. A user-day
without a score (the user's first day in the log) is at level 0, as the live system serves a
user before their first rated return. Splitting by score, not by the day's own gap, keeps the
level of a demonstration known at the time the expert acts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sec_online.evaluation.dataset import TRAIN, EvalDataset
from sec_online.evaluation.simulator import torch_threads
from sec_online.levels import level_of
from sec_online.schemas import FEEDBACK_SIGNALS
from sec_online.settings import Settings

__all__ = [
    "CONTINUOUS",
    "DEFAULT_FUSION_WEIGHTS",
    "DISCRETE",
    "EXPERT_MAX_GAP_DAYS",
    "BehaviourPolicy",
    "Demonstrations",
    "continuous_demonstrations",
    "discrete_demonstrations",
    "is_expert",
    "levels_of_scores",
]

logger = logging.getLogger(__name__)

DISCRETE = "discrete"
CONTINUOUS = "continuous"
ACTION_TYPES = (DISCRETE, CONTINUOUS)
# A user-day is an expert demonstration when the user came back within this many days.
EXPERT_MAX_GAP_DAYS = 3.0
# Fusion weights of the behaviour policy before noise, in ``FEEDBACK_SIGNALS`` order (click,
# long view, like, comment, forward, follow, hate): reward watching, penalise hates.
DEFAULT_FUSION_WEIGHTS = (1.0, 1.0, 0.5, 0.2, 0.2, 0.2, -1.0)
DEFAULT_BEHAVIOUR_NOISE = 0.3
# Episodes of continuous_demonstrations. On the shipped log an episode of 256 users recorded
# about 10,000 requests.
DEFAULT_EPISODES = 4
# State features (sec_online.userstate.feature_names) that place a logged user-day in a level.
RETENTION_SCORE_FEATURE = "retention_score"
HAS_SCORE_FEATURE = "has_retention_score"


class DemonstrationEnv(Protocol):
    """The part of ``RetentionEnv`` that :func:`continuous_demonstrations` uses."""

    boundaries: list[float]

    def reset(self) -> Any: ...

    def step(
        self, actions: torch.Tensor, action_type: str | None = None
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]: ...

    @property
    def done(self) -> bool: ...


@dataclass(frozen=True)
class Demonstrations:
    """Rows of (state, action, level, gap) to clone, with the expert flag of each row.

    Attributes
    ----------
    action_type
        ``"discrete"`` (actions are distributions over ``A`` clusters, rows sum to 1) or
        ``"continuous"`` (actions are 7 fusion weights in ``[-1, 1]``).
    states
        User states, shape ``[N, F]``, float32.
    actions
        Actions, shape ``[N, A]`` or ``[N, 7]``, float32.
    levels
        Retention level of each row in ``[0, n_levels)``, shape ``[N]``, long.
    gap_days
        Days until the user's next active day, shape ``[N]``, float32; NaN when censored.
    expert
        Whether the row is an expert demonstration, shape ``[N]``, bool.
    boundaries
        The ``n_levels - 1`` ascending retention-score boundaries that gave ``levels``.
    """

    action_type: str
    states: torch.Tensor
    actions: torch.Tensor
    levels: torch.Tensor
    gap_days: torch.Tensor
    expert: torch.Tensor
    boundaries: tuple[float, ...]

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def n_levels(self) -> int:
        """Number ``K`` of retention levels."""
        return len(self.boundaries) + 1

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def subset(self, mask: torch.Tensor) -> Demonstrations:
        """Return the rows where the bool ``mask [N]`` is true, with the same boundaries."""
        if mask.shape != (len(self),) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape [{len(self)}], got {mask.shape}")
        return Demonstrations(
            action_type=self.action_type,
            states=self.states[mask],
            actions=self.actions[mask],
            levels=self.levels[mask],
            gap_days=self.gap_days[mask],
            expert=self.expert[mask],
            boundaries=self.boundaries,
        )

    def experts(self) -> Demonstrations:
        """Return the expert rows only."""
        return self.subset(self.expert)

    def level_counts(self) -> list[int]:
        """Rows per level, a list of ``n_levels`` counts."""
        return torch.bincount(self.levels, minlength=self.n_levels).tolist()

    def summary(self) -> dict[str, Any]:
        """Row, expert and per-level counts, as plain JSON values for reports."""
        return {
            "action_type": self.action_type,
            "rows": len(self),
            "experts": int(self.expert.sum()),
            "rows_per_level": self.level_counts(),
            "experts_per_level": self.experts().level_counts(),
            "boundaries": list(self.boundaries),
        }


def discrete_demonstrations(
    dataset: EvalDataset,
    *,
    boundaries: list[float] | None = None,
    max_expert_gap_days: float = EXPERT_MAX_GAP_DAYS,
) -> Demonstrations:
    """Build demonstrations from the logged user-days of the train days.

    Parameters
    ----------
    dataset
        The evaluation dataset. Its ``days`` rows with ``split == "train"`` are used.
    boundaries
        Retention-score boundaries of the levels; ``dataset.level_boundaries`` when ``None``.
    max_expert_gap_days
        A user-day whose uncensored gap is at most this is an expert demonstration.

    Returns
    -------
    Demonstrations
        One row per train user-day with an action. A day whose shown videos all lack a cluster
        has an all-zero action row, nothing to clone, and is left out.
    """
    days = dataset.days[dataset.days["split"] == TRAIN]
    actions = dataset.actions(days)  # [D, A]
    has_action = actions.sum(axis=1) > 0
    days = days[has_action]
    bounds = list(dataset.level_boundaries if boundaries is None else boundaries)
    gap_days = torch.tensor(days["gap_days"].to_numpy(dtype=np.float32))  # [N], NaN if censored
    demonstrations = Demonstrations(
        action_type=DISCRETE,
        states=torch.from_numpy(dataset.states(days)),
        actions=torch.from_numpy(actions[has_action]),
        levels=levels_of_scores(days[RETENTION_SCORE_FEATURE], days[HAS_SCORE_FEATURE], bounds),
        gap_days=gap_days,
        expert=is_expert(gap_days, max_expert_gap_days),
        boundaries=tuple(bounds),
    )
    logger.info(
        "built discrete demonstrations: train_user_days=%d without_action=%d %s",
        len(has_action),
        int((~has_action).sum()),
        _summary_text(demonstrations),
    )
    return demonstrations


class BehaviourPolicy:
    """Fusion weights drawn once per user-day around a default vector, the logging policy.

    At the start of a user-day the user's weights become ``default_weights`` plus Gaussian
    noise of standard deviation ``noise_std``, clipped to ``[-1, 1]``, and stay fixed for the
    day's requests. Varied weights give the cloned experts contrast to learn from, and fixed
    weights within a day tie each day's return gap to one action.

    Parameters
    ----------
    users
        Batch size ``B``.
    default_weights
        The 7 weights before noise, ``FEEDBACK_SIGNALS`` order.
    noise_std
        Standard deviation of the noise per weight.
    """

    name = "behaviour"
    action_type = CONTINUOUS

    def __init__(
        self,
        users: int,
        default_weights: tuple[float, ...] = DEFAULT_FUSION_WEIGHTS,
        noise_std: float = DEFAULT_BEHAVIOUR_NOISE,
    ) -> None:
        if len(default_weights) != len(FEEDBACK_SIGNALS):
            raise ValueError(
                f"default_weights needs {len(FEEDBACK_SIGNALS)} values, got {default_weights}"
            )
        if noise_std < 0:
            raise ValueError(f"noise_std must not be negative, got {noise_std}")
        self.default = torch.tensor(default_weights, dtype=torch.float32)  # [7]
        self.noise_std = noise_std
        self.weights = self.default.expand(users, -1).clone()  # [B, 7]

    def start_days(self, mask: torch.Tensor, generator: torch.Generator) -> None:
        """Draw new weights for the users in the bool ``mask [B]`` whose day starts."""
        count = int(mask.sum())
        if count == 0:
            return
        noise = torch.randn((count, len(FEEDBACK_SIGNALS)), generator=generator)
        self.weights[mask] = (self.default + self.noise_std * noise).clamp(-1.0, 1.0)

    def act(
        self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return the current weights of every user, ``[B, 7]``."""
        return self.weights.clone()


def continuous_demonstrations(
    make_env: Callable[[int], DemonstrationEnv],
    settings: Settings,
    *,
    seed: int,
    episodes: int = DEFAULT_EPISODES,
    default_weights: tuple[float, ...] = DEFAULT_FUSION_WEIGHTS,
    noise_std: float = DEFAULT_BEHAVIOUR_NOISE,
    max_expert_gap_days: float = EXPERT_MAX_GAP_DAYS,
) -> Demonstrations:
    """Roll out :class:`BehaviourPolicy` in the simulator and record every request.

    Parameters
    ----------
    make_env
        Builds the environment of one episode from its seed, ``seed * 1000 + episode``. It
        needs ``reset()``, ``step(actions, "continuous")`` with the info entries ``day_end``
        and ``gap_days``, ``done`` and ``boundaries`` (the level boundaries behind
        ``Observation.levels``), as ``RetentionEnv`` has. Build it on other users or seeds than
        the evaluation.
    settings
        ``levels`` must match the environment's level count.
    seed
        Seed of the behaviour noise and of the episode seeds.
    episodes
        Episodes to record. Each contributes one row per simulated request.
    default_weights, noise_std
        The behaviour policy, see :class:`BehaviourPolicy`.
    max_expert_gap_days
        A user-day whose gap is at most this is an expert demonstration.

    Returns
    -------
    Demonstrations
        One row per request: the state before it, the user-day's weights, the user's level
        (``Observation.levels``, constant within a user-day) and the gap that ended the day.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    generator = torch.Generator().manual_seed(seed)
    parts: list[dict[str, torch.Tensor]] = []
    boundaries: list[float] | None = None
    with torch_threads(1), torch.no_grad():
        for episode in range(episodes):
            env = make_env(seed * 1000 + episode)
            boundaries = _env_boundaries(env, settings, boundaries)
            parts.append(_record_episode(env, default_weights, noise_std, generator))
    assert boundaries is not None
    gap_days = torch.cat([part["gap_days"] for part in parts])
    demonstrations = Demonstrations(
        action_type=CONTINUOUS,
        states=torch.cat([part["states"] for part in parts]),
        actions=torch.cat([part["actions"] for part in parts]),
        levels=torch.cat([part["levels"] for part in parts]),
        gap_days=gap_days,
        expert=is_expert(gap_days, max_expert_gap_days),
        boundaries=tuple(boundaries),
    )
    logger.info(
        "built continuous demonstrations: seed=%d episodes=%d %s",
        seed,
        episodes,
        _summary_text(demonstrations),
    )
    return demonstrations


def _env_boundaries(
    env: DemonstrationEnv, settings: Settings, previous: list[float] | None
) -> list[float]:
    boundaries = [float(value) for value in env.boundaries]
    if len(boundaries) + 1 != settings.levels:
        raise ValueError(
            f"the environment has {len(boundaries) + 1} levels but SEC_LEVELS={settings.levels}; "
            "build the dataset and the environment with the same settings"
        )
    if previous is not None and boundaries != previous:
        raise ValueError(
            f"episodes have different level boundaries ({previous} and {boundaries}); build "
            "every episode's environment from the same dataset"
        )
    return boundaries


def _record_episode(
    env: DemonstrationEnv,
    default_weights: tuple[float, ...],
    noise_std: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Run one episode; return the rows' ``states, actions, levels, gap_days`` tensors."""
    observation = env.reset()
    users = int(observation.states.shape[0])
    behaviour = BehaviourPolicy(users, default_weights, noise_std)
    behaviour.start_days(observation.active, generator)
    day_number = torch.zeros(users, dtype=torch.long)  # user-days finished so far, per user
    rows: dict[str, list[torch.Tensor]] = {key: [] for key in _ROW_KEYS}
    ended: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (user, day, gap)
    while not env.done:
        active = observation.active
        actions = behaviour.act(observation.states, observation.levels, generator)
        _append_rows(rows, observation, actions, day_number, active)
        observation, _, info = env.step(actions, CONTINUOUS)
        ends = info["day_end"]
        ended.append((torch.nonzero(ends).squeeze(1), day_number[ends], info["gap_days"][ends]))
        day_number[ends] += 1
        behaviour.start_days(ends & observation.active, generator)
    gaps = _gap_table(users, int(day_number.max()) + 1, ended)  # [B, days]
    result = {key: torch.cat(values) for key, values in rows.items()}
    result["gap_days"] = gaps[result.pop("user"), result.pop("day_number")]
    return result


_ROW_KEYS = ("states", "actions", "levels", "user", "day_number")


def _append_rows(
    rows: dict[str, list[torch.Tensor]],
    observation: Any,
    actions: torch.Tensor,
    day_number: torch.Tensor,
    active: torch.Tensor,
) -> None:
    rows["states"].append(observation.states[active].to(torch.float32))
    rows["actions"].append(actions[active])
    rows["levels"].append(observation.levels[active].long())
    rows["user"].append(torch.nonzero(active).squeeze(1))
    rows["day_number"].append(day_number[active])


def _gap_table(
    users: int, days: int, ended: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Gap of each (user, user-day number), ``[B, days]``; NaN for a day that never ended."""
    table = torch.full((users, days), math.nan)
    for user, day, gap in ended:
        table[user, day] = gap.to(torch.float32)
    return table


def levels_of_scores(scores: Any, has_score: Any, boundaries: list[float]) -> torch.Tensor:
    """Level of each row, level 0 for rows without a retention score, shape ``[N]`` long."""
    score_values = np.asarray(scores, dtype=np.float64).ravel()
    rated = np.asarray(has_score, dtype=np.float64).ravel() > 0.5
    levels = [
        level_of(score, boundaries) if is_rated else 0
        for score, is_rated in zip(score_values.tolist(), rated.tolist(), strict=True)
    ]
    return torch.tensor(levels, dtype=torch.long)


def is_expert(gap_days: torch.Tensor, max_gap_days: float = EXPERT_MAX_GAP_DAYS) -> torch.Tensor:
    """Rows whose user came back within ``max_gap_days`` days; NaN (censored) gaps are not."""
    return (~torch.isnan(gap_days)) & (gap_days <= max_gap_days)


def _summary_text(demos: Demonstrations) -> str:
    return (
        f"rows={len(demos)} experts={int(demos.expert.sum())} "
        f"rows_per_level={demos.level_counts()} "
        f"experts_per_level={demos.experts().level_counts()}"
    )


def _validate(demos: Demonstrations) -> None:
    if demos.action_type not in ACTION_TYPES:
        raise ValueError(f"action_type must be one of {ACTION_TYPES}, got {demos.action_type!r}")
    n = demos.states.shape[0]
    if demos.states.dim() != 2 or demos.actions.dim() != 2 or demos.actions.shape[0] != n:
        raise ValueError(
            f"states [N, F] and actions [N, A] must share N, got {tuple(demos.states.shape)} "
            f"and {tuple(demos.actions.shape)}"
        )
    for name in ("levels", "gap_days", "expert"):
        if getattr(demos, name).shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {getattr(demos, name).shape}")
    if demos.levels.dtype != torch.long or demos.expert.dtype != torch.bool:
        raise ValueError("levels must be a long tensor and expert a bool tensor")
    if n and (demos.levels.min() < 0 or demos.levels.max() >= demos.n_levels):
        raise ValueError(
            f"levels must be in [0, {demos.n_levels}), got values from "
            f"{int(demos.levels.min())} to {int(demos.levels.max())}"
        )
