import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sec_online.losses import (
    continuous_expert_loss,
    discrete_expert_loss,
    negative_entropy,
    nuclear_norm,
    soft_cross_entropy,
)


def test_soft_cross_entropy_hand_values():
    # Row 0: softmax is uniform over 2 actions. Row 1: softmax is [0.75, 0.25].
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = torch.tensor([math.log(2.0), -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))])
    torch.testing.assert_close(soft_cross_entropy(logits, target), expected)


def test_soft_cross_entropy_one_hot_matches_torch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=generator)
    labels = torch.randint(5, (8,), generator=generator)
    target = F.one_hot(labels, 5).float()
    reference = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(soft_cross_entropy(logits, target), reference)


@pytest.mark.parametrize("n_actions", [2, 7, 32])
def test_negative_entropy_uniform_is_minus_log_a(n_actions):
    logits = torch.full((3, n_actions), 1.7)
    expected = torch.full((3,), -math.log(n_actions))
    torch.testing.assert_close(negative_entropy(logits), expected)


def test_negative_entropy_of_peaked_distribution_near_zero():
    logits = torch.tensor([[1000.0, 0.0, 0.0]])
    value = negative_entropy(logits)
    assert torch.isfinite(value).all()
    assert abs(float(value)) < 1e-6


def test_discrete_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    cross_entropy = [math.log(2.0), -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))]
    neg_entropy = [-math.log(2.0), 0.75 * math.log(0.75) + 0.25 * math.log(0.25)]
    weight = 0.3
    expected = sum(c + weight * h for c, h in zip(cross_entropy, neg_entropy, strict=True)) / 2
    assert float(discrete_expert_loss(logits, target, weight)) == pytest.approx(expected)


def test_discrete_loss_zero_weight_is_mean_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([[0.2, 0.3, 0.5]])
    assert float(discrete_expert_loss(logits, target, 0.0)) == pytest.approx(
        float(soft_cross_entropy(logits, target)[0])
    )


def test_discrete_loss_gradients_finite_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    loss = discrete_expert_loss(logits, target, 0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_nuclear_norm_known_matrix():
    # Singular values of this matrix are 4 and 3.
    matrix = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    assert float(nuclear_norm(matrix)) == pytest.approx(7.0)


def test_nuclear_norm_matches_numpy():
    matrix = np.random.default_rng(1).normal(size=(16, 5))
    expected = np.linalg.norm(matrix, ord="nuc")
    assert float(nuclear_norm(torch.tensor(matrix))) == pytest.approx(expected)


def test_continuous_loss_hand_value():
    pred = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Squared errors per row: 4 and 9, mean 6.5. Nuclear norm of pred: 3 + 4 = 7.
    assert float(continuous_expert_loss(pred, target, 0.1)) == pytest.approx(6.5 - 0.7)


def test_continuous_loss_gradients_finite():
    generator = torch.Generator().manual_seed(2)
    pred = torch.randn(12, 4, generator=generator, requires_grad=True)
    target = torch.randn(12, 4, generator=generator)
    loss = continuous_expert_loss(pred, target, 0.05)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(pred.grad).all()


def test_nuclear_regulariser_rewards_spread_actions():
    # Same squared error, but the rank-2 batch has the larger nuclear norm and so the lower loss.
    target = torch.zeros(2, 2)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss_collapsed = continuous_expert_loss(collapsed, target, 0.5)
    loss_spread = continuous_expert_loss(spread, target, 0.5)
    assert loss_spread < loss_collapsed


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(2, 4\)"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


def test_one_dimensional_input_rejected():
    with pytest.raises(ValueError, match=r"shape \[B, A\]"):
        negative_entropy(torch.zeros(3))


def test_negative_entropy_weight_rejected():
    with pytest.raises(ValueError, match="must not be negative"):
        discrete_expert_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), -0.1)


finite = st.floats(min_value=-30, max_value=30, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(
    logits=st.lists(finite, min_size=4, max_size=4),
    weights=st.lists(st.floats(min_value=0.01, max_value=10), min_size=4, max_size=4),
)
def test_cross_entropy_bounded_by_target_entropy(logits, weights):
    # Gibbs' inequality: cross-entropy H(p, q) >= H(p), with equality when q = p.
    target = torch.tensor([weights], dtype=torch.float64)
    target = target / target.sum()
    scores = torch.tensor([logits], dtype=torch.float64)
    target_entropy = -(target * target.log()).sum()
    assert float(soft_cross_entropy(scores, target)[0]) >= float(target_entropy) - 1e-9
