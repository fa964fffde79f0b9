"""Policies of the offline evaluation: random, popular, and experts cloned from demonstrations.

Every policy has a ``name``, an ``action_type`` and ``act(states, levels, generator)``, the
interface that ``RetentionEnv`` rolls out:

- ``"discrete"`` policies return a distribution over the ``A`` video clusters, ``[B, A]``.
- ``"continuous"`` policies return fusion weights ``[B, 7]`` in ``[-1, 1]`` over the simulator's
  predicted signals (``FEEDBACK_SIGNALS`` order: click, long view, like, comment, forward,
  follow, hate). The environment ranks candidate videos by the weighted sum of the predictions.

:func:`train_cloned` trains the live system's :class:`~sec_online.model.SECModel` offline with
the live losses. One function covers behaviour cloning, SEC and its ablations, which differ only
in their arguments, and :func:`cloned_variants` names the standard set.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from sec_online.evaluation.dataset import EvalDataset
from sec_online.evaluation.demonstrations import (
    ACTION_TYPES,
    CONTINUOUS,
    DISCRETE,
    Demonstrations,
    discrete_demonstrations,
)
from sec_online.evaluation.simulator import torch_threads
from sec_online.losses import continuous_expert_loss, discrete_expert_loss
from sec_online.model import SECModel
from sec_online.schemas import FEEDBACK_SIGNALS
from sec_online.selector import Selector, fit_selector
from sec_online.settings import Settings

__all__ = [
    "FUSION_WEIGHTS",
    "ClonedPolicy",
    "FixedWeightsPolicy",
    "PopularPolicy",
    "RandomPolicy",
    "cloned_variants",
    "cluster_popularity",
    "train_cloned",
]

logger = logging.getLogger(__name__)

# Width of a continuous action: one fusion weight per feedback signal.
FUSION_WEIGHTS = len(FEEDBACK_SIGNALS)
# Passes over the demonstrations. On the shipped log the mean loss of every variant fell by less
# than 0.4 % from the third to the fifth epoch.
DEFAULT_CLONING_EPOCHS = 3


class RandomPolicy:
    """Uniform distribution over clusters, or fusion weights drawn uniformly from ``[-1, 1]``.

    Parameters
    ----------
    action_type
        ``"discrete"`` or ``"continuous"``.
    n_clusters
        Number ``A`` of clusters, required for ``"discrete"``.
    """

    def __init__(self, action_type: str, n_clusters: int | None = None, name: str = "random"):
        _check_action_type(action_type)
        if action_type == DISCRETE and (n_clusters is None or n_clusters < 2):
            raise ValueError(f"a discrete random policy needs n_clusters >= 2, got {n_clusters}")
        self.name = name
        self.action_type = action_type
        self.n_clusters = n_clusters

    def act(
        self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return ``[B, A]`` uniform rows, or ``[B, 7]`` weights drawn with ``generator``."""
        batch = _check_batch(states, levels)
        if self.action_type == DISCRETE:
            assert self.n_clusters is not None
            return torch.full((batch, self.n_clusters), 1.0 / self.n_clusters)
        return torch.rand((batch, FUSION_WEIGHTS), generator=generator) * 2.0 - 1.0


class PopularPolicy:
    """Distribution over clusters proportional to the clusters' train-day impressions.

    Parameters
    ----------
    popularity
        Impressions per cluster, shape ``[A]``, non-negative with a positive sum.
    """

    action_type = DISCRETE

    def __init__(self, popularity: torch.Tensor, name: str = "popular") -> None:
        values = torch.as_tensor(popularity, dtype=torch.float64)
        if values.dim() != 1 or values.shape[0] < 2:
            raise ValueError(f"popularity must have shape [A] with A >= 2, got {values.shape}")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError("popularity must contain finite, non-negative counts")
        if float(values.sum()) <= 0:
            raise ValueError("popularity sums to 0: no train-day impression has a known cluster")
        self.name = name
        self.distribution = (values / values.sum()).to(torch.float32)  # [A]

    @classmethod
    def from_dataset(cls, dataset: EvalDataset, name: str = "popular") -> PopularPolicy:
        """Build the policy from ``dataset.video_popularity`` and ``dataset.video_cluster``."""
        popularity = cluster_popularity(
            dataset.video_popularity, dataset.video_cluster, dataset.n_clusters
        )
        return cls(popularity, name=name)

    def act(
        self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return the same popularity distribution for every user, ``[B, A]``."""
        batch = _check_batch(states, levels)
        return self.distribution.expand(batch, -1).clone()


class FixedWeightsPolicy:
    """The same fusion weights ``[7]`` for every user, such as the result of CEM."""

    action_type = CONTINUOUS

    def __init__(self, weights: torch.Tensor, name: str) -> None:
        values = torch.as_tensor(weights, dtype=torch.float32)
        if values.shape != (FUSION_WEIGHTS,) or not bool(torch.isfinite(values).all()):
            raise ValueError(f"weights must be {FUSION_WEIGHTS} finite floats, got {values}")
        self.name = name
        self.weights = values

    def act(
        self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return the weights repeated for every user, ``[B, 7]``."""
        batch = _check_batch(states, levels)
        return self.weights.expand(batch, -1).clone()


def cluster_popularity(video_popularity: Any, video_cluster: Any, n_clusters: int) -> torch.Tensor:
    """Sum video impressions ``[V]`` by cluster ``[V]`` (-1 skipped), shape ``[A]`` float64."""
    counts = np.asarray(video_popularity, dtype=np.float64)
    clusters = np.asarray(video_cluster, dtype=np.int64)
    if counts.shape != clusters.shape:
        raise ValueError(
            f"video_popularity and video_cluster must have the same shape, got {counts.shape} "
            f"and {clusters.shape}"
        )
    known = clusters >= 0
    if known.any() and clusters[known].max() >= n_clusters:
        raise ValueError(f"video_cluster has values >= n_clusters={n_clusters}")
    totals = np.bincount(clusters[known], weights=counts[known], minlength=n_clusters)
    return torch.from_numpy(totals)


class ClonedPolicy:
    """Level experts cloned into a :class:`SECModel`, and the rule that picks a user's expert.

    The expert of a user is head 0 for a one-head model. With several heads it is the user's
    historical level, or with adaptive selection the level that :meth:`Selector.select` picks:
    the highest level at or below the historical one whose experts' encoded states lie near the
    user's. After each :meth:`act` with adaptive selection, :attr:`last_selected_levels` contains
    the picked levels ``[B]`` so the caller can report how often each expert serves.

    Attributes
    ----------
    model
        The trained model, in eval mode.
    selector
        The fitted selector, ``None`` without adaptive selection.
    loss_history
        Mean training loss of each epoch, in order.
    training_rows
        Demonstration rows per head that the model was trained on.
    """

    def __init__(
        self,
        name: str,
        action_type: str,
        model: SECModel,
        selector: Selector | None = None,
    ) -> None:
        _check_action_type(action_type)
        if selector is not None and selector.n_levels != model.n_levels:
            raise ValueError(
                f"selector has {selector.n_levels} levels but the model has {model.n_levels} heads"
            )
        self.name = name
        self.action_type = action_type
        self.model = model.eval()
        self.selector = selector
        self.last_selected_levels: torch.Tensor | None = None
        self.loss_history: list[float] = []
        self.training_rows: list[int] = []

    @property
    def adaptive_selection(self) -> bool:
        """Whether the selector picks the expert (else the historical level does)."""
        return self.selector is not None

    @torch.no_grad()
    def act(
        self, states: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return each user's expert action, ``[B, A]`` probabilities or ``[B, 7]`` weights.

        The output depends on ``states`` and ``levels`` only, so ``generator`` is not drawn from.
        """
        _check_batch(states, levels)
        z = self.model.encode(states)  # [B, H]
        experts = self._expert_levels(z, levels)  # [B]
        all_scores = torch.stack([head(z) for head in self.model.heads], dim=1)  # [B, K, A]
        index = experts.view(-1, 1, 1).expand(-1, 1, all_scores.shape[-1])
        scores = all_scores.gather(1, index).squeeze(1)  # [B, A]
        if self.selector is not None:
            self.last_selected_levels = experts
        return _actions_from_scores(scores, self.action_type)

    def _expert_levels(self, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        if self.model.n_levels == 1:
            return torch.zeros(z.shape[0], dtype=torch.long)
        if self.selector is not None:
            chosen = self.selector.select(z, levels.long())
            assert isinstance(chosen, torch.Tensor)
            return chosen
        history = levels.long()
        if history.numel() and (history.min() < 0 or history.max() >= self.model.n_levels):
            raise ValueError(
                f"historical levels must be in [0, {self.model.n_levels}), got values from "
                f"{int(history.min())} to {int(history.max())}"
            )
        return history


def _actions_from_scores(scores: torch.Tensor, action_type: str) -> torch.Tensor:
    """Softmax for cluster distributions, tanh for fusion weights in ``[-1, 1]``."""
    if action_type == DISCRETE:
        return torch.softmax(scores, dim=-1)
    return torch.tanh(scores)


def train_cloned(
    dataset: EvalDataset,
    settings: Settings,
    *,
    name: str,
    levels: int,
    entropy_weight: float,
    only_level: int | None = None,
    stratified: bool = True,
    adaptive_selection: bool = False,
    experts_only: bool = True,
    action_type: str = DISCRETE,
    demonstrations: Demonstrations | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_CLONING_EPOCHS,
) -> ClonedPolicy:
    """Clone demonstrations into a :class:`SECModel` with the live system's expert losses.

    Each epoch visits the training rows once in a seeded random order, in mini-batches of
    ``settings.batch_size``, with one Adam step (``settings.learning_rate``) per batch. Discrete
    experts minimise ``discrete_expert_loss`` on the softmax of their head. Continuous experts
    minimise ``continuous_expert_loss`` (squared error minus ``entropy_weight`` times the
    batch's nuclear norm) on ``tanh`` of their head, which keeps weights in ``[-1, 1]``.
    Unlike the live trainer, the feature normaliser is fitted on all training rows before the
    first step, so every step uses the same normalisation.

    Parameters
    ----------
    dataset
        Gives ``n_features``, ``n_clusters`` and, for discrete actions without
        ``demonstrations``, the logged train user-days.
    settings
        ``hidden_size``, ``batch_size``, ``learning_rate``, ``centroids_per_level`` and
        ``delta_quantile`` are used.
    name
        Name of the returned policy, as reports show it.
    levels
        Number ``K`` of heads. With ``stratified``, it must equal the demonstrations' level
        count, and head ``k`` learns from rows of level ``k`` only. Otherwise it must be 1.
    entropy_weight
        lambda of the expert loss, 0 for plain behaviour cloning.
    only_level
        When set, keep only the rows of this level and train one head on them.
    stratified
        Whether head ``k`` learns from rows of level ``k`` (``True``) or one head learns from
        all rows (``False``, requires ``levels == 1``).
    adaptive_selection
        Fit a selector on the encoded training states of each level and pick experts with it.
        Needs ``levels > 1``.
    experts_only
        Clone only expert rows (SEC) or every row (behaviour cloning of all users).
    action_type
        ``"discrete"`` or ``"continuous"``; continuous needs ``demonstrations``.
    demonstrations
        Rows to clone; for discrete actions ``discrete_demonstrations(dataset)`` when ``None``.
    seed
        Seed of the initial weights, the batch order and the selector's k-means.
    epochs
        Passes over the training rows, at least 1.

    Raises
    ------
    ValueError
        When the arguments contradict each other, or no row is left to clone.
    FloatingPointError
        When a training loss is not finite.
    """
    _check_action_type(action_type)
    demos = _training_demonstrations(dataset, action_type, demonstrations)
    rows, heads = _select_rows(demos, levels, only_level, stratified, experts_only)
    _check_selection(adaptive_selection, levels, only_level)
    n_actions = dataset.n_clusters if action_type == DISCRETE else FUSION_WEIGHTS
    _check_widths(rows, dataset.n_features, n_actions)
    model = _new_model(dataset.n_features, n_actions, levels, settings.hidden_size, seed)
    selector = None
    # One intra-op thread: the networks are small, and extra threads slow them down on a
    # busy machine and make float sums depend on the core count.
    with torch_threads(1):
        losses = _fit(model, rows, heads, action_type, entropy_weight, settings, seed, epochs)
        if adaptive_selection:
            selector = _fit_selector(model, rows, heads, levels, demos.boundaries, settings, seed)
    policy = ClonedPolicy(name, action_type, model, selector)
    policy.loss_history = losses
    policy.training_rows = torch.bincount(heads, minlength=levels).tolist()
    logger.info(
        "trained cloned policy: name=%s action_type=%s heads=%d entropy_weight=%s "
        "rows_per_head=%s epochs=%d final_loss=%.4f adaptive_selection=%s",
        name,
        action_type,
        levels,
        entropy_weight,
        policy.training_rows,
        epochs,
        losses[-1],
        adaptive_selection,
    )
    return policy


def cloned_variants(settings: Settings) -> dict[str, dict[str, Any]]:
    """Keyword arguments of :func:`train_cloned` for behaviour cloning, SEC and its ablations.

    Keys are the policy names, also under ``"name"`` in each dict:

    - ``bc``: behaviour cloning of all users' rows, one head, no entropy term.
    - ``bc_top``: behaviour cloning of the top level's experts only, one head.
    - ``sec``: ``settings.levels`` heads on their levels' experts, ``settings.entropy_weight``,
      adaptive selection.
    - ``sec_no_stratification``: one head on all experts, with the entropy term.
    - ``sec_no_entropy``: as ``sec`` with ``entropy_weight = 0``.

    Add ``action_type``, ``demonstrations``, ``seed`` and ``epochs`` per call.
    """
    k = settings.levels
    lam = settings.entropy_weight
    stratified_sec = {"levels": k, "stratified": k > 1, "adaptive_selection": k > 1}
    variants: dict[str, dict[str, Any]] = {
        "bc": {"levels": 1, "entropy_weight": 0.0, "stratified": False, "experts_only": False},
        "bc_top": {"levels": 1, "entropy_weight": 0.0, "only_level": k - 1},
        "sec": {**stratified_sec, "entropy_weight": lam},
        "sec_no_stratification": {"levels": 1, "entropy_weight": lam, "stratified": False},
        "sec_no_entropy": {**stratified_sec, "entropy_weight": 0.0},
    }
    return {name: {"name": name, **kwargs} for name, kwargs in variants.items()}


def _training_demonstrations(
    dataset: EvalDataset, action_type: str, demonstrations: Demonstrations | None
) -> Demonstrations:
    if demonstrations is None:
        if action_type == CONTINUOUS:
            raise ValueError(
                "continuous cloning needs demonstrations: pass the result of "
                "continuous_demonstrations(env, ...)"
            )
        return discrete_demonstrations(dataset)
    if demonstrations.action_type != action_type:
        raise ValueError(
            f"demonstrations are {demonstrations.action_type} but action_type={action_type!r}"
        )
    return demonstrations


def _select_rows(
    demos: Demonstrations,
    levels: int,
    only_level: int | None,
    stratified: bool,
    experts_only: bool,
) -> tuple[Demonstrations, torch.Tensor]:
    """Training rows and the head ``[N]`` that learns from each."""
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    rows = demos.experts() if experts_only else demos
    if only_level is not None:
        if not 0 <= only_level < demos.n_levels:
            raise ValueError(f"only_level must be in [0, {demos.n_levels}), got {only_level}")
        if levels != 1:
            raise ValueError(f"only_level trains one head, so levels must be 1, got {levels}")
        rows = rows.subset(rows.levels == only_level)
    if len(rows) == 0:
        kind = "expert rows" if experts_only else "rows"
        raise ValueError(f"no {kind} to clone (only_level={only_level}); {demos.summary()}")
    if stratified and levels > 1 and only_level is None:
        if levels != demos.n_levels:
            raise ValueError(
                f"stratified cloning needs one head per demonstration level: levels={levels} "
                f"but the demonstrations have {demos.n_levels} levels"
            )
        return rows, rows.levels.clone()
    if levels != 1:
        raise ValueError(f"unstratified cloning trains one head, so levels must be 1, got {levels}")
    return rows, torch.zeros(len(rows), dtype=torch.long)


def _check_selection(adaptive_selection: bool, levels: int, only_level: int | None) -> None:
    if adaptive_selection and (levels < 2 or only_level is not None):
        raise ValueError(
            "adaptive selection chooses between level heads, so it needs levels > 1 and "
            f"only_level=None, got levels={levels} only_level={only_level}"
        )


def _check_widths(rows: Demonstrations, n_features: int, n_actions: int) -> None:
    if rows.states.shape[1] != n_features or rows.actions.shape[1] != n_actions:
        raise ValueError(
            f"demonstrations have {rows.states.shape[1]} features and {rows.actions.shape[1]} "
            f"action entries, expected {n_features} and {n_actions}"
        )


def _new_model(
    n_features: int, n_actions: int, levels: int, hidden_size: int, seed: int
) -> SECModel:
    # Seed the initial weights without touching the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SECModel(n_features, n_actions, levels, hidden_size)


def _fit(
    model: SECModel,
    rows: Demonstrations,
    heads: torch.Tensor,
    action_type: str,
    entropy_weight: float,
    settings: Settings,
    seed: int,
    epochs: int,
) -> list[float]:
    """Train ``model`` and return the mean loss of each epoch."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    model.train()
    model.observe(rows.states)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=generator)
        total = 0.0
        for start in range(0, len(rows), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss = _batch_loss(model, rows, heads, batch, action_type, entropy_weight)
            _step(optimizer, loss, epoch)
            total += float(loss.detach()) * len(batch)
        history.append(total / len(rows))
    model.eval()
    return history


def _batch_loss(
    model: SECModel,
    rows: Demonstrations,
    heads: torch.Tensor,
    batch: torch.Tensor,
    action_type: str,
    entropy_weight: float,
) -> torch.Tensor:
    scores = model.level_logits(rows.states[batch], heads[batch])  # [b, A]
    target = rows.actions[batch]  # [b, A]
    if action_type == DISCRETE:
        return discrete_expert_loss(scores, target, entropy_weight)
    return continuous_expert_loss(torch.tanh(scores), target, entropy_weight)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, epoch: int) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"cloning loss is {value} in epoch {epoch + 1}, so training stopped. Check the "
            "demonstration states for extreme values"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _fit_selector(
    model: SECModel,
    rows: Demonstrations,
    heads: torch.Tensor,
    levels: int,
    boundaries: tuple[float, ...],
    settings: Settings,
    seed: int,
) -> Selector:
    encoded = model.encode(rows.states)  # [N, H]
    return fit_selector(
        [encoded[heads == level] for level in range(levels)],
        centroids_per_level=settings.centroids_per_level,
        delta_quantile=settings.delta_quantile,
        boundaries=list(boundaries),
        seed=seed,
    )


def _check_action_type(action_type: str) -> None:
    if action_type not in ACTION_TYPES:
        raise ValueError(f"action_type must be one of {ACTION_TYPES}, got {action_type!r}")


def _check_batch(states: torch.Tensor, levels: torch.Tensor) -> int:
    if states.dim() != 2 or levels.shape != (states.shape[0],):
        raise ValueError(
            f"states must be [B, F] and levels [B], got {tuple(states.shape)} and "
            f"{tuple(levels.shape)}"
        )
    return int(states.shape[0])
