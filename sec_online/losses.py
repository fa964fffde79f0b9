"""Behaviour-cloning losses of the level experts, with the action entropy regulariser.

Discrete actions (a distribution over video clusters) use a soft cross-entropy plus
``entropy_weight`` times the negative entropy of the predicted distribution, so a larger weight
pushes the experts toward more diverse recommendations. Continuous actions (used by offline
evaluation) have no softmax to take the entropy of. They use the squared error minus
``entropy_weight`` times the nuclear norm of the batch's predicted action matrix, which grows
when the predicted actions of a batch spread over more directions.

Every function works on log-probabilities from ``torch.log_softmax``, so large logits neither
overflow nor produce ``log(0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "continuous_expert_loss",
    "discrete_expert_loss",
    "negative_entropy",
    "nuclear_norm",
    "soft_cross_entropy",
]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Compute the cross-entropy of each row's softmax against a target distribution.

    Parameters
    ----------
    logits
        Unnormalised scores, shape ``[B, A]``.
    target
        Target probabilities, shape ``[B, A]``. Rows are expected to sum to 1, and the function
        does not renormalise them.

    Returns
    -------
    torch.Tensor
        ``-sum_a target[b, a] * log softmax(logits)[b, a]``, shape ``[B]``, in nats.
    """
    _check_pair(logits, target, "logits", "target")
    log_probs = F.log_softmax(logits, dim=-1)  # [B, A]
    return -(target * log_probs).sum(dim=-1)  # [B]


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Compute ``sum_a p log p`` of each row's softmax, which is minus its entropy in nats.

    Parameters
    ----------
    logits
        Unnormalised scores, shape ``[B, A]``.

    Returns
    -------
    torch.Tensor
        Shape ``[B]``, between ``-log(A)`` (uniform) and 0 (one action).
    """
    _check_matrix(logits, "logits")
    log_probs = F.log_softmax(logits, dim=-1)  # [B, A]
    return (log_probs.exp() * log_probs).sum(dim=-1)  # [B]


def discrete_expert_loss(
    logits: torch.Tensor, target: torch.Tensor, entropy_weight: float
) -> torch.Tensor:
    """Compute the batch mean of soft cross-entropy plus ``entropy_weight`` times negative entropy.

    Parameters
    ----------
    logits
        Scores of each sample's own level head, shape ``[B, A]``.
    target
        Target action distributions, shape ``[B, A]``.
    entropy_weight
        lambda, at least 0. Zero gives plain behaviour cloning.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    _check_weight(entropy_weight)
    per_sample = soft_cross_entropy(logits, target) + entropy_weight * negative_entropy(logits)
    return per_sample.mean()


def nuclear_norm(actions: torch.Tensor) -> torch.Tensor:
    """Compute the nuclear norm (sum of singular values) of a batch's action matrix.

    Parameters
    ----------
    actions
        Predicted actions, shape ``[B, A]``.

    Returns
    -------
    torch.Tensor
        Scalar. Its gradient is defined where the singular values are distinct and non-zero,
        which is true for almost every real-valued batch.
    """
    _check_matrix(actions, "actions")
    return torch.linalg.matrix_norm(actions, ord="nuc")


def continuous_expert_loss(
    pred: torch.Tensor, target: torch.Tensor, entropy_weight: float
) -> torch.Tensor:
    """Compute the mean squared error minus ``entropy_weight`` times the nuclear norm of ``pred``.

    Parameters
    ----------
    pred
        Predicted actions, shape ``[B, A]``.
    target
        Logged expert actions, shape ``[B, A]``.
    entropy_weight
        lambda, at least 0.

    Returns
    -------
    torch.Tensor
        Scalar: ``mean_b ||pred_b - target_b||^2 - entropy_weight * ||pred||_*``. The squared
        error is summed over the ``A`` action dimensions and averaged over the batch, while the
        nuclear norm is taken over the whole ``[B, A]`` matrix, so it grows with the batch size.
    """
    _check_pair(pred, target, "pred", "target")
    _check_weight(entropy_weight)
    squared_error = ((pred - target) ** 2).sum(dim=-1).mean()
    return squared_error - entropy_weight * nuclear_norm(pred)


def _check_matrix(tensor: torch.Tensor, name: str) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape [B, A], got {tuple(tensor.shape)}")


def _check_pair(first: torch.Tensor, second: torch.Tensor, name: str, other: str) -> None:
    _check_matrix(first, name)
    if first.shape != second.shape:
        raise ValueError(
            f"{name} and {other} must have the same shape, got {tuple(first.shape)} "
            f"and {tuple(second.shape)}"
        )


def _check_weight(entropy_weight: float) -> None:
    if entropy_weight < 0:
        raise ValueError(f"entropy_weight must not be negative, got {entropy_weight}")
