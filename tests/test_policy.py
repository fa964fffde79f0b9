import base64
import dataclasses
import hashlib
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sec_online.policy import (
    MAX_UPDATE_BYTES,
    InvalidPolicyUpdate,
    Policy,
    PolicyUpdate,
    decode_update,
    encode_update,
)
from sec_online.schemas import Sample
from sec_online.selector import Selector
from sec_online.settings import Settings
from sec_online.trainer import Trainer
from streams.policy_follower import PolicyFollower

N_FEATURES = 45


def make_samples(count: int, n_features: int, n_actions: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        level = index % 3
        actions = [[rng.randrange(n_actions), rng.uniform(0.1, 2.0)] for _ in range(4)]
        samples.append(
            Sample(
                event_id=f"e{index}",
                user_id=index,
                session_id=index,
                time_ms=index,
                features=[rng.gauss(0.0, 1.0) for _ in range(n_features)],
                actions=actions,
                level=level,
                retention_score=rng.random(),
                gap_ms=1000,
            )
        )
    return samples


@pytest.fixture(scope="module")
def default_trainer() -> Trainer:
    # Default settings: 32 clusters, 3 levels, 64 hidden units, 4 centroids per level.
    trainer = Trainer(N_FEATURES, 32, Settings(data_dir=None))
    trainer.learn_many(make_samples(300, N_FEATURES, 32, seed=0))
    return trainer


@pytest.fixture(scope="module")
def update(default_trainer) -> PolicyUpdate:
    return default_trainer.make_update(version=7, created_ms=1_700_000_000_000)


def test_round_trip(update):
    assert decode_update(encode_update(update)) == update


def test_encoded_size_for_default_settings(update):
    size = len(encode_update(update))
    assert [len(level) for level in update.selector["centroids"]] == [4, 4, 4]
    # The policy module documents about 94 kB for these settings.
    assert 80_000 < size < 110_000, size
    assert size < MAX_UPDATE_BYTES


def test_policy_matches_trainer_model(default_trainer, update):
    policy = Policy.from_update(decode_update(encode_update(update)))
    features = make_samples(1, N_FEATURES, 32, seed=1)[0].features
    recommendation = policy.recommend(features, historical_level=2, top_k=32)
    x = torch.tensor([features])
    with torch.no_grad():
        z = default_trainer.model.encode(x)
        expected_level = Selector.from_dict(update.selector).select(z[0], 2)
        expected = torch.softmax(default_trainer.model.heads[expected_level](z)[0], dim=-1)
    assert recommendation.level == expected_level
    for cluster, probability in recommendation.actions:
        assert probability == pytest.approx(float(expected[cluster]), rel=1e-5)


def test_recommend_sorted_top_k(update):
    policy = Policy.from_update(update)
    recommendation = policy.recommend([0.1] * N_FEATURES, historical_level=1, top_k=5)
    probabilities = [probability for _, probability in recommendation.actions]
    assert len(recommendation.actions) == 5
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0 < probability <= 1 for probability in probabilities)
    assert len({cluster for cluster, _ in recommendation.actions}) == 5
    assert recommendation.version == 7
    assert recommendation.historical_level == 1
    assert 0 <= recommendation.level <= 1


def test_recommend_all_actions_sum_to_one(update):
    recommendation = Policy.from_update(update).recommend([0.0] * N_FEATURES, 0, top_k=100)
    assert len(recommendation.actions) == 32
    assert sum(probability for _, probability in recommendation.actions) == pytest.approx(1.0)


def test_model_in_eval_mode(update):
    assert not Policy.from_update(update).model.training


@pytest.mark.parametrize(
    ("features", "level", "top_k", "message"),
    [
        ([0.0] * 3, 0, 5, "expected 45 features, got 3"),
        ([float("nan")] * N_FEATURES, 0, 5, "NaN or infinity"),
        ([0.0] * N_FEATURES, 0, 0, "top_k must be at least 1"),
        ([0.0] * N_FEATURES, 3, 5, r"historical_level must be in \[0, 3\)"),
    ],
)
def test_recommend_rejects_bad_input(update, features, level, top_k, message):
    with pytest.raises(ValueError, match=message):
        Policy.from_update(update).recommend(features, level, top_k=top_k)


def tampered(update: PolicyUpdate, **changes) -> bytes:
    payload = json.loads(encode_update(update))
    payload.update(changes)
    return json.dumps(payload).encode()


def flip_one_weight_byte(update: PolicyUpdate) -> str:
    weights = bytearray(update.weights())
    weights[len(weights) // 2] ^= 0xFF
    return base64.b64encode(bytes(weights)).decode()


def test_checksum_mismatch_rejected(update):
    raw = tampered(update, weights_b64=flip_one_weight_byte(update))
    with pytest.raises(InvalidPolicyUpdate, match="checksum_mismatch") as error:
        decode_update(raw)
    assert error.value.reason == "checksum_mismatch"


def test_missing_field_rejected(update):
    payload = json.loads(encode_update(update))
    del payload["sha256"]
    with pytest.raises(InvalidPolicyUpdate, match="lacks sha256") as error:
        decode_update(json.dumps(payload).encode())
    assert error.value.reason == "missing_field"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "undecodable"),
        (b"\xff\xfe", "undecodable"),
        (b"[1, 2]", "not_object"),
        (b'{"schema": "policy-update/0"}', "unknown_schema"),
    ],
)
def test_undecodable_records_rejected(raw, reason):
    with pytest.raises(InvalidPolicyUpdate) as error:
        decode_update(raw)
    assert error.value.reason == reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"extra": 1}, "unexpected_field"),
        ({"version": "7"}, "wrong_type"),
        ({"version": True}, "wrong_type"),
        ({"version": -1}, "wrong_type"),
        ({"loss": "low"}, "wrong_type"),
        ({"weights_b64": "***"}, "wrong_type"),
        ({"model_config": {"n_features": 45}}, "wrong_type"),
        ({"boundaries": ["a"]}, "wrong_type"),
        ({"boundaries": [0.1, 0.2]}, "invalid_selector"),
        ({"selector": {"centroids": []}}, "invalid_selector"),
    ],
)
def test_invalid_fields_rejected(update, changes, reason):
    with pytest.raises(InvalidPolicyUpdate) as error:
        decode_update(tampered(update, **changes))
    assert error.value.reason == reason


def test_weights_not_fitting_config_rejected(update):
    config = dict(update.model_config, hidden_size=32)
    mismatched = dataclasses.replace(update, model_config=config)
    with pytest.raises(InvalidPolicyUpdate, match="does not load") as error:
        Policy.from_update(mismatched)
    assert error.value.reason == "invalid_weights"


def test_oversized_update_rejected(update):
    huge = dataclasses.replace(update, weights_b64="A" * (MAX_UPDATE_BYTES + 4))
    with pytest.raises(ValueError, match="above the 1000000-byte limit"):
        encode_update(huge)


@settings(max_examples=25, deadline=None)
@given(
    version=st.integers(min_value=0, max_value=2**62),
    created_ms=st.integers(min_value=0, max_value=2**62),
    loss=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)
def test_round_trip_any_counters(update, version, created_ms, loss):
    changed = dataclasses.replace(update, version=version, created_ms=created_ms, loss=loss)
    assert decode_update(encode_update(changed)) == changed


@pytest.mark.parametrize(
    "foreign",
    [b"these bytes are not a torch state_dict", b"\x80\x02", b"PK\x03\x04not a zip archive"],
)
def test_foreign_weights_rejected(update, foreign):
    record = dataclasses.replace(
        update,
        weights_b64=base64.b64encode(foreign).decode(),
        sha256=hashlib.sha256(foreign).hexdigest(),
    )
    decoded = decode_update(encode_update(record))
    with pytest.raises(InvalidPolicyUpdate) as error:
        Policy.from_update(decoded)
    assert error.value.reason == "invalid_weights"


def test_follower_keeps_previous_version(default_trainer, update):
    follower = PolicyFollower(Settings(data_dir=None))
    newer = default_trainer.make_update(version=8, created_ms=1_700_000_000_001)
    foreign = b"not weights"
    unloadable = dataclasses.replace(
        newer,
        weights_b64=base64.b64encode(foreign).decode(),
        sha256=hashlib.sha256(foreign).hexdigest(),
    )
    raw = encode_update(newer)
    assert follower.accept(encode_update(update), offset=0)
    assert not follower.accept(raw[: len(raw) // 2], offset=1)
    assert not follower.accept(tampered(newer, sha256="0" * 64), offset=2)
    assert not follower.accept(encode_update(unloadable), offset=3)
    assert not follower.accept(encode_update(update), offset=4)
    assert follower.update.version == 7
    assert follower.policy.version == 7
    assert follower.invalid_updates == 3
    assert follower.invalid_update_reasons == {
        "undecodable": 1,
        "checksum_mismatch": 1,
        "invalid_weights": 1,
    }
    assert follower.accept(raw, offset=5)
    assert follower.policy.version == 8
