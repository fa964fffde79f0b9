"""The SEC network: a shared state encoder feeding one action head per retention level.

The experts of all levels share the encoder, so every sample improves the state representation,
while head ``k`` learns only from samples of level ``k``. Inputs pass first through a feature
normaliser whose running mean and variance live in buffers, so they travel with the weights in
``state_dict()`` and a served policy normalises exactly like the trainer did.
"""

from __future__ import annotations

import torch
from torch import nn

# A feature whose variance is below this is treated as constant and only centred, not scaled.
MIN_VARIANCE = 1e-12
# Normalised features are clipped to this many standard deviations, so a value far outside what
# the normaliser has seen so far cannot saturate the encoder.
CLIP_STD = 10.0


class FeatureNormalizer(nn.Module):
    """Standardises features with a running mean and variance.

    The statistics change only in :meth:`observe`, which the trainer calls on each training
    batch. :meth:`forward` never updates them, so evaluation and serving are frozen. The buffers
    are float64 because a float32 running sum loses precision after millions of samples.

    Parameters
    ----------
    n_features
        Width ``F`` of the feature vectors.
    """

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.n_features = n_features
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        # Sum of squared deviations from the mean (Welford's M2).
        self.register_buffer("m2", torch.zeros(n_features, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Merge a batch ``[B, F]`` into the running statistics.

        Uses the pairwise update of Chan, Golub and LeVeque, which combines the batch's own mean
        and M2 with the running ones and matches a single pass of Welford's algorithm.
        """
        _check_features(x, self.n_features)
        if x.shape[0] == 0:
            return
        batch = x.to(torch.float64)  # [B, F]
        batch_count = float(batch.shape[0])
        batch_mean = batch.mean(dim=0)  # [F]
        batch_m2 = ((batch - batch_mean) ** 2).sum(dim=0)  # [F]
        total = self.count + batch_count
        delta = batch_mean - self.mean  # [F]
        self.mean += delta * (batch_count / total)
        self.m2 += batch_m2 + delta**2 * (self.count * batch_count / total)
        self.count.copy_(total)

    def variance(self) -> torch.Tensor:
        """Population variance of each feature, shape ``[F]``, or ones before the first batch."""
        if self.count < 1:
            return torch.ones_like(self.m2)
        return self.m2 / self.count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(x - mean) / std`` clipped to ``±CLIP_STD``, shape ``[B, F]``, float32."""
        _check_features(x, self.n_features)
        variance = self.variance()  # [F]
        std = torch.where(variance > MIN_VARIANCE, variance.sqrt(), torch.ones_like(variance))
        scaled = (x.to(torch.float64) - self.mean) / std  # [B, F]
        return scaled.clamp(-CLIP_STD, CLIP_STD).to(torch.float32)


class SECModel(nn.Module):
    """Shared state encoder ``f(s)`` with one linear action head per retention level.

    Parameters
    ----------
    n_features
        Width ``F`` of the user state vector.
    n_actions
        Number ``A`` of discrete actions (video clusters).
    n_levels
        Number ``K`` of retention levels, one head each. Level 0 is the lowest retention.
    hidden_size
        Width ``H`` of the encoder's two ReLU layers, which is also the space in which the
        selector clusters expert states.
    """

    def __init__(self, n_features: int, n_actions: int, n_levels: int, hidden_size: int) -> None:
        super().__init__()
        _check_positive(n_features=n_features, n_levels=n_levels, hidden_size=hidden_size)
        if n_actions < 2:
            raise ValueError(f"n_actions must be at least 2, got {n_actions}")
        self.n_features = n_features
        self.n_actions = n_actions
        self.n_levels = n_levels
        self.hidden_size = hidden_size
        self.normalizer = FeatureNormalizer(n_features)
        self.encoder = nn.Sequential(
            nn.Linear(n_features, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden_size, n_actions) for _ in range(n_levels))

    @classmethod
    def from_config(cls, config: dict[str, int]) -> SECModel:
        """Build an untrained model from the dictionary that :meth:`config` returns."""
        missing = sorted({"n_features", "n_actions", "n_levels", "hidden_size"} - config.keys())
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}: got {config!r}")
        return cls(
            n_features=config["n_features"],
            n_actions=config["n_actions"],
            n_levels=config["n_levels"],
            hidden_size=config["hidden_size"],
        )

    def config(self) -> dict[str, int]:
        """Constructor arguments, as plain JSON values."""
        return {
            "n_features": self.n_features,
            "n_actions": self.n_actions,
            "n_levels": self.n_levels,
            "hidden_size": self.hidden_size,
        }

    def observe(self, x: torch.Tensor) -> None:
        """Update the feature normaliser with a training batch ``[B, F]``."""
        self.normalizer.observe(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw features ``[B, F]`` to encoded states ``[B, H]``."""
        return self.encoder(self.normalizer(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return every head's action scores, shape ``[B, K, A]``."""
        z = self.encode(x)  # [B, H]
        return torch.stack([head(z) for head in self.heads], dim=1)  # [B, K, A]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`logits`."""
        return self.logits(x)

    def level_logits(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Return each sample's scores from the head of its own level, shape ``[B, A]``.

        The gather passes gradient only to the head named in ``levels``, which is what
        restricts head ``k`` to samples of level ``k``.

        Parameters
        ----------
        x
            Raw features, shape ``[B, F]``.
        levels
            Level of each sample, integer tensor of shape ``[B]`` with values in ``[0, K)``.
        """
        self._check_levels(levels, x.shape[0])
        all_logits = self.logits(x)  # [B, K, A]
        index = levels.long().view(-1, 1, 1).expand(-1, 1, self.n_actions)  # [B, 1, A]
        return all_logits.gather(1, index).squeeze(1)  # [B, A]

    def head_logits(self, z: torch.Tensor, level: int) -> torch.Tensor:
        """Return the scores of one head for already encoded states ``[B, H]``, shape ``[B, A]``."""
        if not 0 <= level < self.n_levels:
            raise ValueError(f"level must be in [0, {self.n_levels}), got {level}")
        return self.heads[level](z)

    def _check_levels(self, levels: torch.Tensor, batch: int) -> None:
        if levels.shape != (batch,):
            raise ValueError(f"levels must have shape [{batch}], got {tuple(levels.shape)}")
        if levels.is_floating_point():
            raise ValueError(f"levels must be an integer tensor, got {levels.dtype}")
        if batch and (levels.min() < 0 or levels.max() >= self.n_levels):
            raise ValueError(
                f"levels must be in [0, {self.n_levels}), got values from "
                f"{int(levels.min())} to {int(levels.max())}"
            )


def _check_features(x: torch.Tensor, n_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != n_features:
        raise ValueError(f"features must have shape [B, {n_features}], got {tuple(x.shape)}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
