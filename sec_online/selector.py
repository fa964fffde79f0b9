"""Adaptive expert selection: which level's expert serves a user.

Stratified Expert Cloning (Lin et al., arXiv 2504.05628, section "adaptive expert selection")
describes each level ``k`` by k-means centroids ``mu_{k,c}`` of the encoded states ``f(s)`` of
that level's expert users. For a user with encoded state ``z = f(s)`` and historical retention
level ``r_h`` it computes, per level, the distance to the nearest centroid,

    d_k = min_c || z - mu_{k,c} ||_2,

and serves the user with the expert of the highest level ``k <= r_h`` whose distance stays
within that level's threshold, ``d_k <= delta_k``. A user is never lifted above their own
historical level, but a user whose current state no longer looks like their level's experts
drops to the highest lower level whose experts it does resemble.

Here ``delta_k`` is the ``delta_quantile`` quantile of the distances from the level's own
encoded expert states to their nearest centroid. With ``delta_quantile = 0.9``, a state
qualifies when it is as close to the centroids as 90 % of the level's own experts. A level without
samples has no centroids and ``delta_k = None``, and it never qualifies.

When no level ``k <= r_h`` qualifies, the user gets ``FALLBACK_LEVEL`` (the lowest level).
NOTE: this fallback is not confirmed against the paper's own text. Level 0 is used because it
is the most conservative expert, trained on the users with the weakest retention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from sec_online.levels import level_of

__all__ = ["FALLBACK_LEVEL", "Selector", "fit_selector", "kmeans"]

FALLBACK_LEVEL = 0
DEFAULT_KMEANS_ITERATIONS = 50


def kmeans(
    points: torch.Tensor, k: int, seed: int, iters: int = DEFAULT_KMEANS_ITERATIONS
) -> torch.Tensor:
    """Cluster points with k-means++ seeding and Lloyd iterations.

    Parameters
    ----------
    points
        Points to cluster, shape ``[N, H]``.
    k
        Number of centroids requested, at least 1.
    seed
        Seed of the k-means++ draws. The same points and seed always give the same centroids.
    iters
        Maximum number of Lloyd iterations. The loop stops earlier once no assignment changes.

    Returns
    -------
    torch.Tensor
        Centroids, shape ``[C, H]`` in the dtype of ``points``. ``C = N`` when ``N <= k``, and
        the points themselves are returned. ``C < k`` also when the points hold fewer than ``k``
        distinct values, because k-means++ cannot draw a new centroid at distance 0. A cluster
        that loses all its points keeps its previous centroid.
    """
    if points.dim() != 2:
        raise ValueError(f"points must have shape [N, H], got {tuple(points.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if points.shape[0] <= k:
        return points.clone()
    data = points.to(torch.float64)  # [N, H]
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(data, k, generator)  # [C, H]
    for _ in range(iters):
        assignment = _squared_distances(data, centroids).argmin(dim=1)  # [N]
        updated = _cluster_means(data, assignment, centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.to(points.dtype)


def _kmeans_plus_plus(data: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = int(torch.randint(data.shape[0], (1,), generator=generator))
    chosen = [data[first]]
    closest = _squared_distances(data, data[first : first + 1]).squeeze(1)  # [N]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            break
        index = int(torch.multinomial(closest / total, 1, generator=generator))
        chosen.append(data[index])
        distances = _squared_distances(data, data[index : index + 1]).squeeze(1)  # [N]
        closest = torch.minimum(closest, distances)
    return torch.stack(chosen)  # [C, H]


def _cluster_means(
    data: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    sums = torch.zeros_like(centroids).index_add_(0, assignment, data)  # [C, H]
    counts = torch.bincount(assignment, minlength=centroids.shape[0])  # [C]
    filled = counts > 0
    means = centroids.clone()
    means[filled] = sums[filled] / counts[filled].unsqueeze(1).to(data.dtype)
    return means


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of ``a [N, H]`` and ``b [C, H]``, ``[N, C]``."""
    diff = a.unsqueeze(1) - b.unsqueeze(0)  # [N, C, H]
    return (diff**2).sum(dim=-1)


@dataclass(frozen=True)
class Selector:
    """Centroids and thresholds of every level, and the rule that picks a user's expert.

    Attributes
    ----------
    centroids
        Per level, its centroids as lists of ``H`` floats, or an empty list for a level without
        samples.
    deltas
        Per level, the distance threshold ``delta_k``, or ``None`` for a level without samples.
    boundaries
        The ``K - 1`` ascending retention-score boundaries in force when the selector was fit,
        used by :meth:`level_of` to turn a retention score into a historical level.
    """

    centroids: list[list[list[float]]]
    deltas: list[float | None]
    boundaries: list[float]

    def __post_init__(self) -> None:
        _validate_selector(self.centroids, self.deltas, self.boundaries)

    @property
    def n_levels(self) -> int:
        """Number ``K`` of levels."""
        return len(self.deltas)

    @cached_property
    def dim(self) -> int | None:
        """Width ``H`` of the encoded states, ``None`` while no level has centroids."""
        for level_centroids in self.centroids:
            if level_centroids:
                return len(level_centroids[0])
        return None

    @cached_property
    def _centroid_tensors(self) -> list[torch.Tensor | None]:
        return [
            torch.tensor(level, dtype=torch.float32) if level else None for level in self.centroids
        ]

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Distance ``d_k`` of each state to the nearest centroid of each level.

        Parameters
        ----------
        z
            Encoded states, shape ``[B, H]``.

        Returns
        -------
        torch.Tensor
            Shape ``[B, K]``, ``inf`` for levels without centroids.
        """
        self._check_states(z)
        columns = []
        for centroids in self._centroid_tensors:
            if centroids is None:
                columns.append(torch.full((z.shape[0],), math.inf))
                continue
            squared = _squared_distances(z.to(torch.float32), centroids)  # [B, C]
            columns.append(squared.min(dim=1).values.sqrt())  # [B]
        return torch.stack(columns, dim=1)  # [B, K]

    def select(self, z: torch.Tensor, historical_level: int | torch.Tensor) -> int | torch.Tensor:
        """Pick the expert level of one user or of a batch of users.

        Parameters
        ----------
        z
            Encoded state ``[H]``, or a batch ``[B, H]``.
        historical_level
            Historical retention level ``r_h`` in ``[0, K)``: an int, or for a batch an int or
            an integer tensor ``[B]``.

        Returns
        -------
        int or torch.Tensor
            An int for one state, a ``torch.long`` tensor ``[B]`` for a batch. The value is the
            highest level ``k <= r_h`` with ``d_k <= delta_k``, else ``FALLBACK_LEVEL``.
        """
        single = z.dim() == 1
        states = z.unsqueeze(0) if single else z  # [B, H]
        history = self._historical_tensor(historical_level, states.shape[0])  # [B]
        qualifies = self.distances(states) <= self._delta_tensor()  # [B, K]
        levels = torch.arange(self.n_levels)  # [K]
        allowed = qualifies & (levels.unsqueeze(0) <= history.unsqueeze(1))  # [B, K]
        best = torch.where(allowed, levels, -1).max(dim=1).values  # [B]
        chosen = torch.where(best >= 0, best, FALLBACK_LEVEL)
        return int(chosen[0]) if single else chosen

    def level_of(self, retention_score: float) -> int:
        """Historical level of a retention score under :attr:`boundaries`."""
        return level_of(retention_score, self.boundaries)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form, read back by :meth:`from_dict`."""
        return {
            "centroids": [[list(row) for row in level] for level in self.centroids],
            "deltas": list(self.deltas),
            "boundaries": list(self.boundaries),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Selector:
        """Rebuild a selector from :meth:`to_dict` output, raising ``ValueError`` if malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"selector must be a JSON object, got {type(data).__name__}")
        expected = {"centroids", "deltas", "boundaries"}
        if set(data) != expected:
            raise ValueError(
                f"selector must have exactly the keys {sorted(expected)}, got {sorted(data)}"
            )
        return cls(
            centroids=_float_rows(data["centroids"]),
            deltas=[_optional_float(value, "deltas") for value in _as_list(data["deltas"])],
            boundaries=[_float(value, "boundaries") for value in _as_list(data["boundaries"])],
        )

    def _delta_tensor(self) -> torch.Tensor:
        # A level without samples gets -inf, which no distance satisfies.
        values = [-math.inf if delta is None else delta for delta in self.deltas]
        return torch.tensor(values, dtype=torch.float32)  # [K]

    def _historical_tensor(self, historical_level: int | torch.Tensor, batch: int) -> torch.Tensor:
        history = torch.as_tensor(historical_level)
        if history.is_floating_point() or history.dtype == torch.bool:
            raise ValueError(f"historical_level must be an integer, got {history.dtype}")
        history = history.long().expand(batch) if history.dim() == 0 else history.long()
        if history.shape != (batch,):
            raise ValueError(
                f"historical_level must be one int or shape [{batch}], got {tuple(history.shape)}"
            )
        if batch and (history.min() < 0 or history.max() >= self.n_levels):
            raise ValueError(
                f"historical_level must be in [0, {self.n_levels}), got values from "
                f"{int(history.min())} to {int(history.max())}"
            )
        return history

    def _check_states(self, z: torch.Tensor) -> None:
        if z.dim() != 2:
            raise ValueError(f"encoded states must have shape [B, H], got {tuple(z.shape)}")
        if self.dim is not None and z.shape[1] != self.dim:
            raise ValueError(
                f"encoded states have width {z.shape[1]}, but the centroids have width "
                f"{self.dim}, so the selector and the model come from different configurations"
            )


def fit_selector(
    encoded_by_level: Sequence[torch.Tensor],
    centroids_per_level: int,
    delta_quantile: float,
    boundaries: Sequence[float],
    seed: int,
) -> Selector:
    """Fit the centroids and thresholds of every level.

    Parameters
    ----------
    encoded_by_level
        Per level, the encoded states ``f(s)`` of that level's expert samples, shape
        ``[N_k, H]``. ``N_k`` may be 0.
    centroids_per_level
        Centroids requested per level. A level with fewer samples gets one per sample.
    delta_quantile
        Quantile in ``(0, 1]`` of each level's own state-to-nearest-centroid distances that
        becomes ``delta_k``.
    boundaries
        Retention-score boundaries to store with the selector.
    seed
        Base seed. Level ``k`` clusters with ``seed + k``.
    """
    if not 0 < delta_quantile <= 1:
        raise ValueError(f"delta_quantile must be in (0, 1], got {delta_quantile}")
    centroids: list[list[list[float]]] = []
    deltas: list[float | None] = []
    for level, states in enumerate(encoded_by_level):
        if states.dim() != 2:
            raise ValueError(
                f"encoded states of level {level} must have shape [N, H], got {tuple(states.shape)}"
            )
        if states.shape[0] == 0:
            centroids.append([])
            deltas.append(None)
            continue
        level_centroids = kmeans(states.detach(), centroids_per_level, seed + level)  # [C, H]
        nearest = _squared_distances(states.detach(), level_centroids).min(dim=1).values.sqrt()
        delta = torch.quantile(nearest.to(torch.float64), delta_quantile)
        centroids.append(level_centroids.to(torch.float64).tolist())
        deltas.append(float(delta))
    return Selector(centroids=centroids, deltas=deltas, boundaries=[float(b) for b in boundaries])


def _validate_selector(
    centroids: list[list[list[float]]], deltas: list[float | None], boundaries: list[float]
) -> None:
    if len(centroids) != len(deltas) or not deltas:
        raise ValueError(
            f"selector needs one centroid list and one delta per level, got {len(centroids)} "
            f"centroid lists and {len(deltas)} deltas"
        )
    if len(boundaries) != len(deltas) - 1:
        raise ValueError(
            f"selector with {len(deltas)} levels needs {len(deltas) - 1} boundaries, "
            f"got {len(boundaries)}"
        )
    if any(later < earlier for earlier, later in zip(boundaries, boundaries[1:], strict=False)):
        raise ValueError(f"boundaries must be ascending, got {boundaries}")
    widths = {len(row) for level in centroids for row in level}
    if len(widths) > 1 or 0 in widths:
        raise ValueError(f"all centroids must have the same non-zero width, got {sorted(widths)}")
    for level, (level_centroids, delta) in enumerate(zip(centroids, deltas, strict=True)):
        if bool(level_centroids) != (delta is not None):
            raise ValueError(
                f"level {level} must have both centroids and a delta, or neither "
                f"({len(level_centroids)} centroids, delta={delta})"
            )
        if delta is not None and not (math.isfinite(delta) and delta >= 0):
            raise ValueError(f"delta of level {level} must be finite and >= 0, got {delta}")
        if any(not math.isfinite(value) for row in level_centroids for value in row):
            raise ValueError(f"centroids of level {level} contain a non-finite value")


def _as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON array, got {type(value).__name__}")
    return value


def _float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must contain numbers, got {value!r}")
    return float(value)


def _optional_float(value: Any, field: str) -> float | None:
    return None if value is None else _float(value, field)


def _float_rows(value: Any) -> list[list[list[float]]]:
    return [
        [[_float(x, "centroids") for x in _as_list(row)] for row in _as_list(level)]
        for level in _as_list(value)
    ]
