"""Policy updates: the trained model and selector as one self-checking JSON record.

The trainer publishes a :class:`PolicyUpdate` on the ``policy-updates`` topic, and servers
rebuild a :class:`Policy` from it. The weights are ``torch.save`` bytes of the model's
``state_dict`` in base64, with their SHA-256 so a truncated or altered record is rejected
instead of half-loaded. Servers load them with ``torch.load(weights_only=True)``, which
refuses arbitrary pickled objects.

With the default settings (45 features, 32 clusters, 3 levels, 64 hidden units, 4 centroids
per level) an encoded update is about 94 kB, measured by ``tests/test_policy.py``. That is
well below Kafka's default 1 MB message limit (``message.max.bytes``), and
:func:`encode_update` raises before producing a record above ``MAX_UPDATE_BYTES``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import pickle
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sec_online.model import SECModel
from sec_online.selector import Selector

__all__ = [
    "MAX_UPDATE_BYTES",
    "POLICY_UPDATE_SCHEMA",
    "InvalidPolicyUpdate",
    "Policy",
    "PolicyUpdate",
    "Recommendation",
    "build_update",
    "decode_update",
    "encode_update",
]

POLICY_UPDATE_SCHEMA = "policy-update/1"
# Kafka brokers accept 1,048,588-byte records by default (message.max.bytes since Kafka 1.1) and
# producers send up to 1,048,576 (max.request.size). This cap leaves room for key and headers.
MAX_UPDATE_BYTES = 1_000_000
_MODEL_CONFIG_KEYS = ("n_features", "n_actions", "n_levels", "hidden_size")


class InvalidPolicyUpdate(ValueError):
    """A policy update that cannot be decoded, fails validation or does not load.

    ``reason`` is a short stable code: ``undecodable``, ``not_object``, ``unknown_schema``,
    ``missing_field``, ``unexpected_field``, ``wrong_type``, ``checksum_mismatch``,
    ``invalid_selector`` or ``invalid_weights``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class PolicyUpdate:
    """One published version of the policy.

    Attributes
    ----------
    version
        Policy version, increasing with each publication.
    created_ms
        Creation time, milliseconds since the Unix epoch.
    samples_seen
        Training samples the trainer had learned from.
    training_steps
        Optimiser steps the trainer had taken.
    loss
        Loss of the last training step, ``None`` before the first step.
    model_config
        Constructor arguments of :class:`~sec_online.model.SECModel`.
    weights_b64
        Base64 of the ``torch.save`` bytes of the model's ``state_dict``.
    sha256
        Hex SHA-256 of the decoded weight bytes.
    selector
        :meth:`Selector.to_dict` of the fitted selector.
    boundaries
        Retention-score boundaries of the levels at publication time.
    """

    version: int
    created_ms: int
    samples_seen: int
    training_steps: int
    loss: float | None
    model_config: dict[str, int]
    weights_b64: str
    sha256: str
    selector: dict[str, Any]
    boundaries: list[float]
    schema: str = field(default=POLICY_UPDATE_SCHEMA)

    def weights(self) -> bytes:
        """Decoded weight bytes, the input of ``torch.load``."""
        return base64.b64decode(self.weights_b64, validate=True)


@dataclass(frozen=True)
class Recommendation:
    """Result of :meth:`Policy.recommend`.

    ``actions`` contains ``(cluster, probability)`` pairs of the selected level's expert, sorted by
    probability, highest first.
    """

    version: int
    level: int
    historical_level: int
    actions: list[tuple[int, float]]


def build_update(
    model: SECModel,
    selector: Selector,
    *,
    version: int,
    created_ms: int,
    samples_seen: int,
    training_steps: int,
    loss: float | None,
) -> PolicyUpdate:
    """Package a model and its selector as a :class:`PolicyUpdate`."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    weights = buffer.getvalue()
    return PolicyUpdate(
        version=version,
        created_ms=created_ms,
        samples_seen=samples_seen,
        training_steps=training_steps,
        loss=loss if loss is not None and math.isfinite(loss) else None,
        model_config=model.config(),
        weights_b64=base64.b64encode(weights).decode("ascii"),
        sha256=hashlib.sha256(weights).hexdigest(),
        selector=selector.to_dict(),
        boundaries=list(selector.boundaries),
    )


def encode_update(update: PolicyUpdate) -> bytes:
    """Serialise an update as compact UTF-8 JSON.

    Raises
    ------
    ValueError
        When the record would exceed ``MAX_UPDATE_BYTES``. A smaller ``SEC_HIDDEN_SIZE`` or
        ``SEC_CENTROIDS_PER_LEVEL`` shrinks it.
    """
    raw = json.dumps(asdict(update), separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_UPDATE_BYTES:
        raise ValueError(
            f"policy update version {update.version} is {len(raw)} bytes, above the "
            f"{MAX_UPDATE_BYTES}-byte limit of a Kafka message. Lower SEC_HIDDEN_SIZE or "
            "SEC_CENTROIDS_PER_LEVEL"
        )
    return raw


def decode_update(raw: bytes) -> PolicyUpdate:
    """Decode and validate an update, raising :class:`InvalidPolicyUpdate` on any defect.

    Checks the JSON structure, every field's type, the selector and the weights' checksum.
    Whether the weights fit the model configuration is checked by :meth:`Policy.from_update`.
    """
    payload = _load_object(raw)
    if payload.get("schema") != POLICY_UPDATE_SCHEMA:
        raise InvalidPolicyUpdate(
            "unknown_schema",
            f"schema {payload.get('schema')!r}, expected {POLICY_UPDATE_SCHEMA!r}",
        )
    _check_fields(payload)
    _check_types(payload)
    update = PolicyUpdate(**payload)
    _check_checksum(update)
    try:
        selector = Selector.from_dict(update.selector)
    except ValueError as exc:
        raise InvalidPolicyUpdate("invalid_selector", str(exc)) from exc
    if [float(b) for b in update.boundaries] != selector.boundaries:
        raise InvalidPolicyUpdate(
            "invalid_selector",
            f"boundaries {update.boundaries} differ from the selector's {selector.boundaries}",
        )
    return update


class Policy:
    """A servable policy: the model in eval mode and its selector.

    Build it with :meth:`from_update`. :meth:`recommend` is read-only, so one instance can
    serve concurrent callers.
    """

    def __init__(self, version: int, model: SECModel, selector: Selector) -> None:
        if selector.n_levels != model.n_levels:
            raise ValueError(
                f"selector has {selector.n_levels} levels but the model has {model.n_levels}"
            )
        if selector.dim is not None and selector.dim != model.hidden_size:
            raise ValueError(
                f"selector centroids have width {selector.dim} but the model encodes to "
                f"{model.hidden_size}"
            )
        self.version = version
        self.model = model.eval()
        self.selector = selector

    @classmethod
    def from_update(cls, update: PolicyUpdate) -> Policy:
        """Rebuild the model and selector of an update.

        Raises
        ------
        InvalidPolicyUpdate
            When the weights or the selector do not fit the model configuration.
        """
        try:
            model = SECModel.from_config(update.model_config)
            state = torch.load(io.BytesIO(update.weights()), map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            return cls(update.version, model, Selector.from_dict(update.selector))
        # torch.load raises many types on foreign bytes: IndexError, EOFError, RuntimeError or
        # UnpicklingError among them (torch 2.9).
        except (
            RuntimeError,
            ValueError,
            TypeError,
            LookupError,
            EOFError,
            pickle.UnpicklingError,
            binascii.Error,
        ) as exc:
            raise InvalidPolicyUpdate(
                "invalid_weights", f"policy version {update.version} does not load: {exc}"
            ) from exc

    def recommend(
        self, features: list[float], historical_level: int, top_k: int = 5
    ) -> Recommendation:
        """Recommend video clusters for one user.

        Parameters
        ----------
        features
            The user's state vector, ``n_features`` finite numbers.
        historical_level
            The user's historical retention level in ``[0, K)``.
        top_k
            Number of clusters to return, at least 1 and capped at ``n_actions``.
        """
        x = self._features_tensor(features)  # [1, F]
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        with torch.inference_mode():
            z = self.model.encode(x)  # [1, H]
            level = self.selector.select(z[0], historical_level)
            probabilities = torch.softmax(self.model.head_logits(z, level)[0], dim=-1)  # [A]
            top = torch.topk(probabilities, min(top_k, self.model.n_actions))
        actions = [
            (int(cluster), float(probability))
            for probability, cluster in zip(top.values, top.indices, strict=True)
        ]
        return Recommendation(self.version, level, historical_level, actions)

    def _features_tensor(self, features: list[float]) -> torch.Tensor:
        if len(features) != self.model.n_features:
            raise ValueError(
                f"expected {self.model.n_features} features, got {len(features)}, so the policy "
                "and the feature builder disagree on the state layout"
            )
        x = torch.tensor([features], dtype=torch.float32)  # [1, F]
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or infinity")
        return x


def _load_object(raw: bytes) -> dict[str, Any]:
    if raw is None:
        raise InvalidPolicyUpdate("undecodable", "record has no value")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidPolicyUpdate("undecodable", f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidPolicyUpdate(
            "not_object", f"expected a JSON object, got {type(payload).__name__}"
        )
    return payload


def _check_fields(payload: dict[str, Any]) -> None:
    expected = set(PolicyUpdate.__dataclass_fields__)
    missing = sorted(expected - payload.keys())
    if missing:
        raise InvalidPolicyUpdate("missing_field", f"policy update lacks {', '.join(missing)}")
    unexpected = sorted(payload.keys() - expected)
    if unexpected:
        raise InvalidPolicyUpdate(
            "unexpected_field", f"policy update has unknown {', '.join(unexpected)}"
        )


def _check_types(payload: dict[str, Any]) -> None:
    for name in ("version", "created_ms", "samples_seen", "training_steps"):
        if not _is_int(payload[name]) or payload[name] < 0:
            raise InvalidPolicyUpdate(
                "wrong_type", f"{name}={payload[name]!r} must be a non-negative integer"
            )
    loss = payload["loss"]
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, int | float)):
        raise InvalidPolicyUpdate("wrong_type", f"loss={loss!r} must be a number or null")
    for name in ("weights_b64", "sha256"):
        if not isinstance(payload[name], str) or not payload[name]:
            raise InvalidPolicyUpdate("wrong_type", f"{name} must be a non-empty string")
    config = payload["model_config"]
    if not isinstance(config, dict) or set(config) != set(_MODEL_CONFIG_KEYS):
        raise InvalidPolicyUpdate(
            "wrong_type", f"model_config must have exactly the keys {list(_MODEL_CONFIG_KEYS)}"
        )
    if not all(_is_int(value) and value >= 1 for value in config.values()):
        raise InvalidPolicyUpdate("wrong_type", f"model_config={config!r} needs positive ints")
    if not isinstance(payload["selector"], dict):
        raise InvalidPolicyUpdate("wrong_type", "selector must be a JSON object")
    boundaries = payload["boundaries"]
    if not isinstance(boundaries, list) or not all(
        not isinstance(value, bool) and isinstance(value, int | float) for value in boundaries
    ):
        raise InvalidPolicyUpdate("wrong_type", "boundaries must be an array of numbers")


def _check_checksum(update: PolicyUpdate) -> None:
    try:
        weights = update.weights()
    except (binascii.Error, ValueError) as exc:
        raise InvalidPolicyUpdate("wrong_type", f"weights_b64 is not valid base64: {exc}") from exc
    digest = hashlib.sha256(weights).hexdigest()
    if digest != update.sha256:
        raise InvalidPolicyUpdate(
            "checksum_mismatch",
            f"policy version {update.version}: weights hash to {digest}, record says "
            f"{update.sha256}, so the record was truncated or altered",
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
