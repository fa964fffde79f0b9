"""Evaluation statistics: ROC AUC against a pairwise count, total variation, nuclear norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sec_online.evaluation.metrics import average_ranks, nuclear_norm, roc_auc, total_variation


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of (positive, negative) pairs ordered correctly, ties counting one half."""
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = 0.0
    for p in positives:
        for n in negatives:
            if p > n:
                wins += 1.0
            elif p == n:
                wins += 0.5
    return wins / (len(positives) * len(negatives))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(-3, 3)),  # few distinct scores: many ties
        min_size=2,
        max_size=40,
    )
)
def test_auc_matches_pairwise_count(pairs):
    labels = np.array([label for label, _ in pairs])
    scores = np.array([score for _, score in pairs], dtype=np.float64) / 2.0
    auc = roc_auc(labels, scores)
    if labels.min() == labels.max():
        assert math.isnan(auc)
    else:
        assert auc == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_on_continuous_scores():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=300)
    scores = labels * 0.5 + rng.normal(size=300)
    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_extremes_and_tensors():
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(labels, torch.tensor([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(labels, torch.tensor([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, torch.tensor([0.5, 0.5, 0.5, 0.5])) == 0.5


def test_auc_rejects_invalid_input():
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])


def test_average_ranks_share_ties():
    ranks = average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0]))
    assert ranks.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_total_variation_values():
    assert total_variation([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert total_variation([1.0, 0.0], [0.0, 1.0]) == 1.0
    assert total_variation([0.6, 0.3, 0.1], [0.3, 0.3, 0.4]) == pytest.approx(0.3)


def test_total_variation_normalises_counts():
    assert total_variation([6, 3, 1], [3, 3, 4]) == pytest.approx(0.3)


def test_total_variation_rejects_invalid_input():
    with pytest.raises(ValueError, match="same shape"):
        total_variation([1, 0], [1, 0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        total_variation([1, -1], [1, 0])
    with pytest.raises(ValueError, match="sums to 0"):
        total_variation([0, 0], [1, 0])


def test_nuclear_norm_matches_numpy():
    matrix = np.random.default_rng(0).normal(size=(40, 7))
    expected = np.linalg.svd(matrix, compute_uv=False).sum()
    assert nuclear_norm(matrix) == pytest.approx(expected, rel=1e-12)
    assert nuclear_norm(torch.as_tensor(matrix, dtype=torch.float32)) == pytest.approx(
        expected, rel=1e-5
    )


def test_nuclear_norm_of_identical_rows_is_one_direction():
    row = np.array([3.0, 4.0])  # norm 5
    matrix = np.tile(row, (9, 1))  # rank 1: its one singular value is 5 * sqrt(9)
    assert nuclear_norm(matrix) == pytest.approx(15.0)
    assert nuclear_norm(np.eye(4)) == pytest.approx(4.0)


def test_nuclear_norm_edge_cases():
    assert nuclear_norm(np.zeros((0, 3))) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        nuclear_norm(np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        nuclear_norm(np.array([[1.0, float("inf")]]))
