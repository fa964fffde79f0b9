"""Online fine-tuning of the level experts from a stream of behaviour-cloning samples.

A :class:`Trainer` owns the model, its Adam optimiser, the streaming level boundaries and, per
level, a bounded reservoir of raw feature vectors from which :meth:`Trainer.make_update` fits
the selector. Everything random is seeded from ``Settings.seed``, so two trainers fed the same
samples end with identical weights, and :meth:`Trainer.checkpoint` captures every piece of
state, so a restored trainer continues exactly where the original stopped.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sec_online.levels import LevelBoundaries
from sec_online.losses import discrete_expert_loss
from sec_online.model import SECModel
from sec_online.policy import PolicyUpdate, build_update
from sec_online.schemas import MAX_INT, Sample
from sec_online.selector import fit_selector
from sec_online.settings import Settings

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOSS_HISTORY_SIZE",
    "RESERVOIR_SIZE",
    "InvalidCheckpoint",
    "Reservoir",
    "Trainer",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "sec-trainer-checkpoint/1"
# Raw feature vectors kept per level for the selector: 2,000 x 45 float32 is about 360 kB.
RESERVOIR_SIZE = 2000
LOSS_HISTORY_SIZE = 1000

# Skip reasons, also the keys of ``Trainer.samples_skipped``.
SKIP_LEVEL = "level_out_of_range"
SKIP_FEATURES = "invalid_features"
SKIP_SCORE = "invalid_retention_score"
SKIP_ACTION = "invalid_action"
SKIP_NO_WEIGHT = "no_positive_weight"
# A sample of a session the trainer already learned, or of an earlier session of the same user:
# a worker that died after sending samples and before storing the states that emitted them
# sends them again.
SKIP_REPEATED = "already_learned"


class InvalidCheckpoint(ValueError):
    """A trainer checkpoint that cannot be read or does not match the settings."""


@dataclass(frozen=True)
class _Example:
    features: torch.Tensor  # [F], float32
    target: torch.Tensor  # [A], float32, sums to 1
    level: int
    retention_score: float


class Reservoir:
    """Uniform sample of at most ``capacity`` rows from a stream (Vitter's algorithm R).

    The ``n``-th row offered replaces a random slot with probability ``capacity / n``, so every
    row seen so far is kept with the same probability. Draws come from the generator passed to
    :meth:`add`, which keeps the sample reproducible under a seed.
    """

    def __init__(self, capacity: int, n_features: int) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rows = torch.zeros(capacity, n_features)  # [capacity, F]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, row: torch.Tensor, generator: torch.Generator) -> None:
        """Offer one feature vector ``[F]``."""
        self.seen += 1
        if self._size < self.capacity:
            self._rows[self._size] = row
            self._size += 1
            return
        slot = int(torch.randint(self.seen, (1,), generator=generator))
        if slot < self.capacity:
            self._rows[slot] = row

    def rows(self) -> torch.Tensor:
        """Copy of the kept rows, shape ``[len(self), F]``."""
        return self._rows[: self._size].clone()

    def state(self) -> dict[str, Any]:
        """Tensors and counters for a checkpoint."""
        return {"rows": self.rows(), "seen": self.seen}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        rows = state["rows"]
        if rows.dim() != 2 or rows.shape[0] > self.capacity or rows.shape[1] != self._rows.shape[1]:
            raise InvalidCheckpoint(
                f"reservoir rows of shape {tuple(rows.shape)} do not fit capacity "
                f"{self.capacity} and {self._rows.shape[1]} features"
            )
        self._size = rows.shape[0]
        self._rows[: self._size] = rows
        self.seen = int(state["seen"])


class Trainer:
    """Fine-tunes the SEC experts on mini-batches of samples and packages policy updates.

    Parameters
    ----------
    n_features
        Width ``F`` of ``Sample.features``.
    n_actions
        Number ``A`` of video clusters. ``Sample.actions`` name clusters in ``[0, A)``.
    settings
        Uses ``levels``, ``hidden_size``, ``batch_size``, ``learning_rate``,
        ``entropy_weight``, ``centroids_per_level``, ``delta_quantile`` and ``seed``.
    reservoir_size
        Feature vectors kept per level for the selector.

    Attributes
    ----------
    samples_seen
        Samples learned from, not counting skipped ones.
    samples_skipped
        Skipped samples by reason: ``level_out_of_range``, ``invalid_features``,
        ``invalid_retention_score``, ``invalid_action``, ``no_positive_weight``,
        ``already_learned``.
    last_sessions
        Per user id, the newest session learned from. A user's sessions close in order, so a
        sample of this session or an earlier one is a repeat.
    steps
        Adam steps taken, one per mini-batch.
    last_loss
        Loss of the last step, ``None`` before the first.
    loss_history
        Losses of the last ``LOSS_HISTORY_SIZE`` steps, oldest first.
    """

    def __init__(
        self,
        n_features: int,
        n_actions: int,
        settings: Settings,
        reservoir_size: int = RESERVOIR_SIZE,
    ) -> None:
        self.settings = settings
        self.n_features = n_features
        self.n_actions = n_actions
        self.n_levels = settings.levels
        # Seed the initial weights without touching the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.model = SECModel(n_features, n_actions, settings.levels, settings.hidden_size)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate)
        self.boundaries = LevelBoundaries(settings.levels)
        self.reservoirs = [Reservoir(reservoir_size, n_features) for _ in range(settings.levels)]
        self._generator = torch.Generator().manual_seed(settings.seed)
        self.samples_seen = 0
        self.samples_skipped: Counter[str] = Counter()
        self.last_sessions: dict[int, int] = {}
        self.steps = 0
        self.last_loss: float | None = None
        self.loss_history: deque[float] = deque(maxlen=LOSS_HISTORY_SIZE)

    def learn_many(self, samples: Sequence[Sample]) -> list[float]:
        """Learn from samples in mini-batches of ``settings.batch_size``, one Adam step each.

        Invalid samples are skipped and counted in :attr:`samples_skipped` instead of raising.
        Each valid sample also updates the feature normaliser, its level's reservoir and the
        level boundaries (with its ``retention_score``) before its batch's step.

        Returns
        -------
        list[float]
            The loss of every step taken, in order. Empty when no sample was valid.

        Raises
        ------
        FloatingPointError
            When a batch's loss is not finite. That batch's step is not taken.
        """
        examples: list[_Example] = []
        skipped: Counter[str] = Counter()
        for sample in samples:
            example = self._prepare(sample)
            if isinstance(example, str):
                skipped[example] += 1
            else:
                examples.append(example)
        if skipped:
            self.samples_skipped.update(skipped)
            logger.warning(
                "skipped %d of %d samples: %s",
                sum(skipped.values()),
                len(samples),
                ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items())),
            )
        batch_size = self.settings.batch_size
        return [
            self._learn_batch(examples[start : start + batch_size])
            for start in range(0, len(examples), batch_size)
        ]

    def make_update(self, version: int, created_ms: int) -> PolicyUpdate:
        """Fit the selector on the reservoirs and package the current model as an update.

        The reservoirs are encoded with the current encoder, so the centroids live in the same
        space as the published weights. No random draw is consumed here, so publishing does not
        change what later training does.
        """
        with torch.no_grad():
            encoded = [self.model.encode(reservoir.rows()) for reservoir in self.reservoirs]
        selector = fit_selector(
            encoded,
            centroids_per_level=self.settings.centroids_per_level,
            delta_quantile=self.settings.delta_quantile,
            boundaries=self.boundaries.get(),
            seed=self.settings.seed,
        )
        return build_update(
            self.model,
            selector,
            version=version,
            created_ms=created_ms,
            samples_seen=self.samples_seen,
            training_steps=self.steps,
            loss=self.last_loss,
        )

    def checkpoint(self) -> bytes:
        """Serialise the whole training state with ``torch.save``, for :meth:`restore`."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model.config(),
            "reservoir_size": self.reservoirs[0].capacity,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "reservoirs": [reservoir.state() for reservoir in self.reservoirs],
            "generator": self._generator.get_state(),
            "boundaries": _pickle_tensor(self.boundaries),
            "samples_seen": self.samples_seen,
            "samples_skipped": dict(self.samples_skipped),
            "last_sessions": _int_pairs(self.last_sessions),
            "steps": self.steps,
            "last_loss": self.last_loss,
            "loss_history": list(self.loss_history),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    @classmethod
    def restore(cls, blob: bytes, settings: Settings) -> Trainer:
        """Rebuild a trainer from :meth:`checkpoint` output.

        ``settings.levels`` and ``settings.hidden_size`` must match the checkpoint. A different
        ``settings.learning_rate`` replaces the saved one, and the other settings apply from
        the next step on.

        Raises
        ------
        InvalidCheckpoint
            When the blob is not a trainer checkpoint of this format or does not match the
            settings.
        """
        state = _load_checkpoint(blob)
        config = state["model_config"]
        _check_compatible(config, settings)
        trainer = cls(config["n_features"], config["n_actions"], settings, state["reservoir_size"])
        try:
            trainer._load_state(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise InvalidCheckpoint(f"trainer checkpoint does not load: {exc}") from exc
        logger.info(
            "restored trainer: steps=%d samples_seen=%d levels=%d",
            trainer.steps,
            trainer.samples_seen,
            trainer.n_levels,
        )
        return trainer

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            if group["lr"] != self.settings.learning_rate:
                logger.info(
                    "learning rate changed from %s to %s", group["lr"], self.settings.learning_rate
                )
                group["lr"] = self.settings.learning_rate
        if len(state["reservoirs"]) != self.n_levels:
            raise InvalidCheckpoint(
                f"checkpoint has {len(state['reservoirs'])} reservoirs for {self.n_levels} levels"
            )
        for reservoir, reservoir_state in zip(self.reservoirs, state["reservoirs"], strict=True):
            reservoir.load_state(reservoir_state)
        self._generator.set_state(state["generator"])
        self.boundaries = _unpickle_boundaries(state["boundaries"], self.n_levels)
        self.samples_seen = int(state["samples_seen"])
        self.samples_skipped = Counter(state["samples_skipped"])
        self.last_sessions = _int_dict(state.get("last_sessions"))
        self.steps = int(state["steps"])
        self.last_loss = state["last_loss"]
        self.loss_history = deque(state["loss_history"], maxlen=LOSS_HISTORY_SIZE)

    def _learn_batch(self, batch: list[_Example]) -> float:
        x = torch.stack([example.features for example in batch])  # [B, F]
        target = torch.stack([example.target for example in batch])  # [B, A]
        levels = torch.tensor([example.level for example in batch], dtype=torch.long)  # [B]
        self.model.observe(x)
        for example in batch:
            self.reservoirs[example.level].add(example.features, self._generator)
            self.boundaries.update(example.retention_score)
        logits = self.model.level_logits(x, levels)  # [B, A]
        loss = discrete_expert_loss(logits, target, self.settings.entropy_weight)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss is {value} at step {self.steps + 1}, so the step was not taken "
                "and the weights are unchanged. Check the features for extreme values"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.samples_seen += len(batch)
        self.last_loss = value
        self.loss_history.append(value)
        return value

    def _prepare(self, sample: Sample) -> _Example | str:
        """Turn a sample into tensors, or return the reason to skip it."""
        user_id, session_id = sample.user_id, sample.session_id
        tracked = _is_int(user_id) and _is_int(session_id)
        if tracked and session_id <= self.last_sessions.get(user_id, -1):
            return SKIP_REPEATED
        example = self._validate(sample)
        # Only a sample that is learned marks its session, so an invalid one is counted as
        # invalid again when it is sent again.
        if tracked and not isinstance(example, str):
            self.last_sessions[user_id] = session_id
        return example

    def _validate(self, sample: Sample) -> _Example | str:
        level = sample.level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.n_levels:
            return SKIP_LEVEL
        features = _features_tensor(sample.features, self.n_features)
        if features is None:
            return SKIP_FEATURES
        score = sample.retention_score
        if (
            isinstance(score, bool)
            or not isinstance(score, int | float)
            or not math.isfinite(score)
        ):
            return SKIP_SCORE
        target = _target_distribution(sample.actions, self.n_actions)
        if isinstance(target, str):
            return target
        return _Example(features, target, level, float(score))


def _features_tensor(features: Any, n_features: int) -> torch.Tensor | None:
    if not isinstance(features, list | tuple) or len(features) != n_features:
        return None
    if not all(_is_number(value) for value in features):
        return None
    tensor = torch.tensor(features, dtype=torch.float32)  # [F]
    return tensor if bool(torch.isfinite(tensor).all()) else None


def _target_distribution(actions: Any, n_actions: int) -> torch.Tensor | str:
    """Normalised action distribution ``[A]`` from ``[[cluster, weight], ...]``, or a skip reason.

    Weights of repeated clusters add up. Zero weights are allowed and ignored, while negative
    or non-finite weights and clusters outside ``[0, A)`` invalidate the sample.
    """
    if not isinstance(actions, list | tuple):
        return SKIP_ACTION
    weights = [0.0] * n_actions
    for pair in actions:
        parsed = _parse_action(pair, n_actions)
        if parsed is None:
            return SKIP_ACTION
        cluster, weight = parsed
        weights[cluster] += weight
    total = math.fsum(weights)
    if not math.isfinite(total):
        return SKIP_ACTION
    if total <= 0:
        return SKIP_NO_WEIGHT
    return torch.tensor([weight / total for weight in weights], dtype=torch.float32)  # [A]


def _parse_action(pair: Any, n_actions: int) -> tuple[int, float] | None:
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        return None
    cluster, weight = pair
    if not (_is_number(cluster) and _is_number(weight)):
        return None
    if not (math.isfinite(cluster) and math.isfinite(weight)) or weight < 0:
        return None
    if cluster != int(cluster) or not 0 <= cluster < n_actions:
        return None
    return int(cluster), float(weight)


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true/false in a sample is a schema error.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_compatible(config: dict[str, int], settings: Settings) -> None:
    for key, setting, env in (
        ("n_levels", settings.levels, "SEC_LEVELS"),
        ("hidden_size", settings.hidden_size, "SEC_HIDDEN_SIZE"),
    ):
        if config.get(key) != setting:
            raise InvalidCheckpoint(
                f"checkpoint was written with {key}={config.get(key)}, but {env}={setting}. "
                f"Set {env}={config.get(key)} or start from an empty checkpoint folder"
            )


def _is_int(value: Any) -> bool:
    """Return whether ``value`` is an integer that fits the int64 tensors of a checkpoint."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT


def _int_pairs(values: dict[int, int]) -> torch.Tensor:
    """Pack a dict of 64-bit integers into an [N, 2] tensor, compact in a checkpoint."""
    if not values:
        return torch.zeros((0, 2), dtype=torch.int64)
    return torch.tensor(list(values.items()), dtype=torch.int64)


def _int_dict(pairs: Any) -> dict[int, int]:
    # Checkpoints written before repeats were tracked have no pairs.
    if pairs is None:
        return {}
    if not isinstance(pairs, torch.Tensor) or pairs.ndim != 2 or pairs.shape[1] != 2:
        raise InvalidCheckpoint("checkpoint last_sessions is not an [N, 2] integer tensor")
    return dict(pairs.tolist())


def _load_checkpoint(blob: bytes) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise InvalidCheckpoint(f"not a readable trainer checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InvalidCheckpoint(
            f"trainer checkpoint has format {found!r}, expected {CHECKPOINT_FORMAT!r}: "
            "it was written by another release, so start from an empty checkpoint folder"
        )
    return state


def _pickle_tensor(value: object) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).clone()


class _BoundariesUnpickler(pickle.Unpickler):
    """Unpickler that builds only the classes of a pickled ``LevelBoundaries``.

    River's P-square quantiles can be pickled but offer no other way to save their state.
    The whitelist keeps a tampered checkpoint from running arbitrary code on load.
    """

    ALLOWED = {
        ("sec_online.levels", "LevelBoundaries"),
        ("river.stats.quantile", "Quantile"),
        ("river._river_rust.stats", "RsQuantile"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"checkpoint boundaries refer to {module}.{name}, which is not allowed"
            )
        return super().find_class(module, name)


def _unpickle_boundaries(data: torch.Tensor, levels: int) -> LevelBoundaries:
    try:
        boundaries = _BoundariesUnpickler(io.BytesIO(data.numpy().tobytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise InvalidCheckpoint(f"level boundaries in the checkpoint do not load: {exc}") from exc
    if not isinstance(boundaries, LevelBoundaries) or boundaries.levels != levels:
        raise InvalidCheckpoint(f"checkpoint boundaries are not LevelBoundaries({levels})")
    return boundaries
