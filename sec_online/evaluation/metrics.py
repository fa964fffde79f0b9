"""Statistics of the offline evaluation: ROC AUC, total variation distance, nuclear norm."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of binary ``labels`` ranked by ``scores``.

    Computed from ranks as the Mann-Whitney U statistic over ``n_pos * n_neg``: the share of
    (positive, negative) pairs that the scores order correctly, where a tie counts one half.
    Tied scores share their average rank, which is what gives ties that half.

    Parameters
    ----------
    labels
        Array-like of shape ``[N]`` with values 0 and 1 (bool, int or float).
    scores
        Array-like of shape ``[N]``, finite; higher means more likely positive.

    Returns
    -------
    float
        The AUC in [0, 1], or NaN when ``labels`` contains only one class, where AUC is
        undefined.

    Raises
    ------
    ValueError
        When the shapes differ, a label is not 0 or 1, or a score is not finite.
    """
    y = _as_numpy(labels).astype(np.float64).ravel()
    s = _as_numpy(scores).astype(np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {len(y)} and {len(s)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:5].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite, got {int((~np.isfinite(s)).sum())} others")
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = average_ranks(s)
    u = ranks[y == 1.0].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N of a 1-D array, where tied values share the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each group of equal values
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse]


def total_variation(p: Any, q: Any) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` between two distributions.

    Both inputs are normalised to sum 1 first, so histograms of counts are accepted.

    Raises
    ------
    ValueError
        When the shapes differ, or an input has a negative or non-finite entry or sums to 0.
    """
    p_array = _distribution(p, "p")
    q_array = _distribution(q, "q")
    if p_array.shape != q_array.shape:
        raise ValueError(
            f"p and q must have the same shape, got {p_array.shape} and {q_array.shape}"
        )
    return float(0.5 * np.abs(p_array - q_array).sum())


def nuclear_norm(matrix: Any) -> float:
    """Sum of the singular values of a 2-D matrix, computed in float64.

    For a batch of actions ``[B, D]`` it grows with the number of independent directions the
    rows span, so it measures how much the actions differ across users. The singular values
    come from ``torch.linalg.svdvals``, which follows ``torch.set_num_threads``; NumPy's SVD
    uses every BLAS thread and was 30 times slower on a busy 2-core machine.
    """
    array = torch.as_tensor(_as_numpy(matrix), dtype=torch.float64)
    if array.dim() != 2:
        raise ValueError(f"nuclear_norm needs a 2-D matrix, got shape {tuple(array.shape)}")
    if array.numel() == 0:
        return 0.0
    if not torch.isfinite(array).all():
        raise ValueError("nuclear_norm needs finite entries")
    return float(torch.linalg.svdvals(array).sum())


def _distribution(values: Any, name: str) -> np.ndarray:
    array = _as_numpy(values).astype(np.float64).ravel()
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{name} must have finite, non-negative entries, got {array.tolist()}")
    total = array.sum()
    if total <= 0:
        raise ValueError(f"{name} sums to {total}, so it cannot be normalised to a distribution")
    return array / total


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
