import dataclasses
import io
import math
import pickle
import random

import pytest
import torch

import sec_online.trainer as trainer_module
from sec_online.losses import negative_entropy
from sec_online.policy import Policy
from sec_online.schemas import Sample
from sec_online.settings import Settings
from sec_online.trainer import InvalidCheckpoint, Reservoir, Trainer, _target_distribution

N_FEATURES = 6
N_ACTIONS = 6


def make_settings(**overrides) -> Settings:
    values = dict(
        data_dir=None,
        levels=3,
        clusters=N_ACTIONS,
        hidden_size=32,
        batch_size=32,
        learning_rate=0.01,
        entropy_weight=0.0,
        centroids_per_level=3,
        delta_quantile=0.9,
        seed=0,
    )
    values.update(overrides)
    return Settings(**values)


def make_sample(index, features, actions, level, score=0.5) -> Sample:
    return Sample(
        event_id=f"e{index}",
        user_id=index,
        session_id=index,
        time_ms=index,
        features=features,
        actions=actions,
        level=level,
        retention_score=score,
        gap_ms=1000,
    )


def stratified_samples(count: int, seed: int) -> list[Sample]:
    """Level k prefers cluster 2k when feature 0 is positive and 2k + 1 otherwise."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        level = index % 3
        features = [rng.gauss(0.0, 1.0) for _ in range(N_FEATURES)]
        preferred = 2 * level if features[0] > 0 else 2 * level + 1
        actions = [[preferred, 3.0], [rng.randrange(N_ACTIONS), 1.0]]
        score = rng.uniform(level / 3, (level + 1) / 3)
        samples.append(make_sample(index, features, actions, level, score))
    return samples


def probe_features(sign: float) -> torch.Tensor:
    return torch.tensor([[sign * 1.5] + [0.0] * (N_FEATURES - 1)])


def later_sessions(samples: list[Sample], epoch: int) -> list[Sample]:
    """The same samples as sessions after all earlier ones: a trainer skips repeated sessions."""
    shift = epoch * (max(sample.session_id for sample in samples) + 1)
    return [dataclasses.replace(sample, session_id=sample.session_id + shift) for sample in samples]


def train(settings: Settings, samples: list[Sample], epochs: int) -> Trainer:
    trainer = Trainer(N_FEATURES, N_ACTIONS, settings)
    for epoch in range(epochs):
        trainer.learn_many(later_sessions(samples, epoch))
    return trainer


@pytest.fixture(scope="module")
def learned() -> Trainer:
    return train(make_settings(), stratified_samples(900, seed=1), epochs=4)


def test_each_level_head_learns_its_clusters(learned):
    with torch.no_grad():
        for sign, offset in ((1.0, 0), (-1.0, 1)):
            logits = learned.model.logits(probe_features(sign))[0]  # [K, A]
            for level in range(3):
                assert int(logits[level].argmax()) == 2 * level + offset, (level, sign)


def test_loss_decreases(learned):
    history = list(learned.loss_history)
    assert sum(history[-10:]) / 10 < sum(history[:10]) / 10


def test_counters(learned):
    assert learned.samples_seen == 3600
    assert learned.steps == 4 * math.ceil(900 / 32)
    assert learned.last_loss == learned.loss_history[-1]
    assert not learned.samples_skipped


def test_entropy_weight_raises_predicted_entropy():
    samples = stratified_samples(600, seed=2)
    plain = train(make_settings(entropy_weight=0.0), samples, epochs=3)
    diverse = train(make_settings(entropy_weight=1.0), samples, epochs=3)
    probes = torch.cat([probe_features(1.0), probe_features(-1.0)])
    with torch.no_grad():
        entropy_plain = -negative_entropy(plain.model.logits(probes).flatten(0, 1)).mean()
        entropy_diverse = -negative_entropy(diverse.model.logits(probes).flatten(0, 1)).mean()
    assert entropy_diverse > entropy_plain + 0.1


def test_same_seed_same_weights():
    samples = stratified_samples(200, seed=3)
    first = train(make_settings(), samples, epochs=1)
    second = train(make_settings(), samples, epochs=1)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_other_seed_other_weights():
    first = Trainer(N_FEATURES, N_ACTIONS, make_settings(seed=0))
    second = Trainer(N_FEATURES, N_ACTIONS, make_settings(seed=1))
    assert not torch.equal(first.model.heads[0].weight, second.model.heads[0].weight)


def test_trainer_leaves_global_rng_alone():
    before = torch.get_rng_state()
    Trainer(N_FEATURES, N_ACTIONS, make_settings())
    assert torch.equal(torch.get_rng_state(), before)


def test_batches_follow_batch_size():
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings(batch_size=4))
    losses = trainer.learn_many(stratified_samples(10, seed=4))
    assert len(losses) == 3
    assert trainer.steps == 3
    assert trainer.samples_seen == 10


def test_invalid_samples_skipped_and_counted():
    good = [0.0] * N_FEATURES
    samples = [
        make_sample(0, good, [[1, 1.0]], level=3),
        make_sample(1, good, [[1, 1.0]], level=-1),
        make_sample(2, good, [[1, 1.0]], level=True),
        make_sample(3, good[:-1], [[1, 1.0]], level=0),
        make_sample(4, [math.nan] + good[1:], [[1, 1.0]], level=0),
        make_sample(5, good, [[1, 1.0]], level=0, score=math.inf),
        make_sample(6, good, [], level=0),
        make_sample(7, good, [[1, 0.0], [2, 0.0]], level=0),
        make_sample(8, good, [[N_ACTIONS, 1.0]], level=0),
        make_sample(9, good, [[1, -1.0]], level=0),
        make_sample(10, good, [[1.5, 1.0]], level=0),
        make_sample(11, good, [[1, 1.0, 2.0]], level=0),
        make_sample(12, good, [[1, 1.0]], level=1),
    ]
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    losses = trainer.learn_many(samples)
    assert len(losses) == 1
    assert trainer.samples_seen == 1
    assert dict(trainer.samples_skipped) == {
        "level_out_of_range": 3,
        "invalid_features": 2,
        "invalid_retention_score": 1,
        "no_positive_weight": 2,
        "invalid_action": 4,
    }
    assert trainer.boundaries.count == 1
    assert [len(reservoir) for reservoir in trainer.reservoirs] == [0, 1, 0]


def test_repeated_sessions_skipped():
    samples = stratified_samples(64, seed=3)
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    trainer.learn_many(samples)
    steps, seen = trainer.steps, trainer.samples_seen

    # A worker that died between sending samples and storing states sends them again.
    assert trainer.learn_many(samples[10:40]) == []
    assert (trainer.steps, trainer.samples_seen) == (steps, seen)
    assert trainer.samples_skipped == {"already_learned": 30}

    earlier = dataclasses.replace(samples[5], session_id=samples[5].session_id - 1)
    later = dataclasses.replace(samples[5], session_id=samples[5].session_id + 1)
    assert len(trainer.learn_many([earlier, later])) == 1
    assert trainer.samples_seen == seen + 1
    assert trainer.samples_skipped == {"already_learned": 31}
    assert trainer.last_sessions[samples[5].user_id] == later.session_id


def test_restore_keeps_learned_sessions():
    samples = stratified_samples(40, seed=4)
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    trainer.learn_many(samples)
    restored = Trainer.restore(trainer.checkpoint(), make_settings())
    assert restored.last_sessions == trainer.last_sessions
    assert restored.learn_many(samples) == []
    assert restored.samples_skipped == {"already_learned": 40}


def test_restore_reads_checkpoint_without_learned_sessions():
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    trainer.learn_many(stratified_samples(40, seed=5))
    state = torch.load(io.BytesIO(trainer.checkpoint()), weights_only=True)
    del state["last_sessions"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    restored = Trainer.restore(buffer.getvalue(), make_settings())
    assert restored.last_sessions == {}
    assert restored.samples_seen == 40


def test_only_invalid_samples_takes_no_step():
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    assert trainer.learn_many([make_sample(0, [0.0] * N_FEATURES, [], level=0)]) == []
    assert trainer.steps == 0
    assert trainer.last_loss is None


def test_target_distribution_normalises_and_merges_repeats():
    target = _target_distribution([[2, 1.0], [0, 2.0], [2.0, 1.0], [3, 0.0]], 4)
    torch.testing.assert_close(target, torch.tensor([0.5, 0.0, 0.5, 0.0]))


def test_loss_history_bounded(monkeypatch):
    monkeypatch.setattr(trainer_module, "LOSS_HISTORY_SIZE", 5)
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings(batch_size=1))
    losses = trainer.learn_many(stratified_samples(12, seed=5))
    assert list(trainer.loss_history) == losses[-5:]


def test_reservoir_bounded_and_reproducible():
    rows = torch.arange(500, dtype=torch.float32).unsqueeze(1)
    kept = []
    for _ in range(2):
        reservoir = Reservoir(50, 1)
        generator = torch.Generator().manual_seed(9)
        for row in rows:
            reservoir.add(row, generator)
        kept.append(reservoir.rows())
        assert len(reservoir) == 50
        assert reservoir.seen == 500
    assert torch.equal(kept[0], kept[1])
    # A uniform sample of 0..499 reaches well beyond the first 50 rows.
    assert float(kept[0].max()) > 250


def test_trainer_reservoirs_capped():
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings(), reservoir_size=20)
    trainer.learn_many(stratified_samples(150, seed=6))
    assert [len(reservoir) for reservoir in trainer.reservoirs] == [20, 20, 20]
    assert [reservoir.seen for reservoir in trainer.reservoirs] == [50, 50, 50]


def test_boundaries_follow_retention_scores(learned):
    # Scores of level k are uniform on [k/3, (k+1)/3), so the tertiles are near 1/3 and 2/3.
    lower, upper = learned.boundaries.get()
    assert lower == pytest.approx(1 / 3, abs=0.05)
    assert upper == pytest.approx(2 / 3, abs=0.05)


def test_make_update_fits_selector(learned):
    update = learned.make_update(version=3, created_ms=1_700_000_000_000)
    assert update.version == 3
    assert update.samples_seen == learned.samples_seen
    assert update.training_steps == learned.steps
    assert update.loss == learned.last_loss
    assert update.boundaries == learned.boundaries.get()
    assert [len(level) for level in update.selector["centroids"]] == [3, 3, 3]
    assert all(delta is not None and delta >= 0 for delta in update.selector["deltas"])
    policy = Policy.from_update(update)
    recommendation = policy.recommend(probe_features(1.0)[0].tolist(), historical_level=2)
    assert 0 <= recommendation.level <= 2


def test_make_update_without_samples():
    update = Trainer(N_FEATURES, N_ACTIONS, make_settings()).make_update(0, 0)
    assert update.selector["deltas"] == [None, None, None]
    assert update.loss is None
    recommendation = Policy.from_update(update).recommend([0.0] * N_FEATURES, 2)
    assert recommendation.level == 0


def test_make_update_leaves_training_unchanged():
    samples = stratified_samples(120, seed=7)
    with_update = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    without = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    for trainer in (with_update, without):
        trainer.learn_many(samples[:60])
    with_update.make_update(1, 0)
    assert with_update.learn_many(samples[60:]) == without.learn_many(samples[60:])


def test_restore_continues_identically():
    samples = stratified_samples(400, seed=8)
    original = Trainer(N_FEATURES, N_ACTIONS, make_settings(), reservoir_size=30)
    original.learn_many(samples[:200])
    blob = original.checkpoint()
    restored = Trainer.restore(blob, make_settings())

    assert original.learn_many(samples[200:]) == restored.learn_many(samples[200:])
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(tensor, restored.model.state_dict()[name]), name
    for level in range(3):
        assert torch.equal(original.reservoirs[level].rows(), restored.reservoirs[level].rows())
    assert original.boundaries.get() == restored.boundaries.get()
    assert original.boundaries.count == restored.boundaries.count
    assert (original.steps, original.samples_seen) == (restored.steps, restored.samples_seen)
    assert list(original.loss_history) == list(restored.loss_history)
    assert original.make_update(2, 5) == restored.make_update(2, 5)


def test_restore_keeps_skip_counts():
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    trainer.learn_many([make_sample(0, [0.0] * N_FEATURES, [], level=0)])
    restored = Trainer.restore(trainer.checkpoint(), make_settings())
    assert restored.samples_skipped == {"no_positive_weight": 1}


def test_restore_applies_new_learning_rate():
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    restored = Trainer.restore(trainer.checkpoint(), make_settings(learning_rate=0.5))
    assert restored.optimizer.param_groups[0]["lr"] == 0.5


def test_restore_rejects_other_level_count():
    blob = Trainer(N_FEATURES, N_ACTIONS, make_settings()).checkpoint()
    with pytest.raises(InvalidCheckpoint, match="n_levels=3, but SEC_LEVELS=4"):
        Trainer.restore(blob, make_settings(levels=4))


def test_restore_rejects_garbage():
    with pytest.raises(InvalidCheckpoint, match="not a readable trainer checkpoint"):
        Trainer.restore(b"not a checkpoint", make_settings())


def test_restore_rejects_other_format():
    buffer = io.BytesIO()
    torch.save({"format": "something-else/9"}, buffer)
    with pytest.raises(InvalidCheckpoint, match="format 'something-else/9'"):
        Trainer.restore(buffer.getvalue(), make_settings())


class _Payload:
    """Object whose unpickling would call print: a stand-in for a malicious checkpoint."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_restore_refuses_foreign_classes_in_boundaries():
    trainer = Trainer(N_FEATURES, N_ACTIONS, make_settings())
    state = torch.load(io.BytesIO(trainer.checkpoint()), weights_only=True)
    state["boundaries"] = torch.frombuffer(bytearray(pickle.dumps(_Payload())), dtype=torch.uint8)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with pytest.raises(InvalidCheckpoint, match="builtins.print, which is not allowed"):
        Trainer.restore(buffer.getvalue(), make_settings())
