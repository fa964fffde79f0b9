import random

import pytest
from rocksdict import Options, Rdict

from sec_online.schemas import Sample
from sec_online.settings import Settings
from sec_online.trainer import Trainer
from state.checkpoints import (
    FORMAT,
    CheckpointFormatError,
    CheckpointStore,
    CheckpointStoreError,
)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "checkpoints"


def raw_db(path) -> Rdict:
    return Rdict(str(path), options=Options(raw_mode=True))


def test_empty_store(path):
    with CheckpointStore(path) as store:
        assert store.load_latest() is None
        assert store.versions() == []


def test_save_and_load_latest(path):
    with CheckpointStore(path) as store:
        store.save(1, b"first", {"steps": 10})
        store.save(2, b"second", {"steps": 20})
        assert store.load_latest() == (2, b"second", {"steps": 20})


def test_survives_reopen(path):
    with CheckpointStore(path) as store:
        store.save(3, b"\x00blob\xff", {"loss": 1.5})
    with CheckpointStore(path) as store:
        assert store.load_latest() == (3, b"\x00blob\xff", {"loss": 1.5})
        assert store.versions() == [3]


def test_versions_in_numeric_order(path):
    with CheckpointStore(path) as store:
        for version in (9, 10, 100, 1001):
            store.save(version, b"x", {})
        assert store.versions() == [9, 10, 100, 1001]


def test_rejects_version_not_newer(path):
    with CheckpointStore(path) as store:
        store.save(5, b"x", {})
        with pytest.raises(ValueError, match="version 5 is not newer than .* 5"):
            store.save(5, b"y", {})
        with pytest.raises(ValueError, match="not newer"):
            store.save(4, b"y", {})
        assert store.load_latest() == (5, b"x", {})


@pytest.mark.parametrize("version", [-1, True, 1.0])
def test_rejects_invalid_version(path, version):
    with CheckpointStore(path) as store, pytest.raises(ValueError, match="non-negative int"):
        store.save(version, b"x", {})


def test_rejects_unserialisable_meta_without_writing(path):
    with CheckpointStore(path) as store:
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            store.save(1, b"x", {"bad": object()})
        assert store.load_latest() is None
        assert store.versions() == []


def test_prune_keeps_newest(path):
    with CheckpointStore(path) as store:
        for version in range(1, 8):
            store.save(version, f"blob{version}".encode(), {"v": version})
        assert store.prune(keep=3) == 4
        assert store.versions() == [5, 6, 7]
        assert store.load_latest() == (7, b"blob7", {"v": 7})
        assert store.prune(keep=3) == 0


def test_prune_rejects_keep_zero(path):
    with CheckpointStore(path) as store, pytest.raises(ValueError, match="at least 1"):
        store.prune(keep=0)


def test_other_format_rejected(path):
    with CheckpointStore(path):
        pass
    db = raw_db(path)
    db[b"format"] = b"sec-online-checkpoints/0"
    db.close()
    with pytest.raises(CheckpointFormatError, match="format 'sec-online-checkpoints/0'"):
        CheckpointStore(path)


def test_foreign_database_rejected(path):
    db = raw_db(path)
    db[b"some-key"] = b"value"
    db.close()
    with pytest.raises(CheckpointFormatError, match="no format key"):
        CheckpointStore(path)


def test_format_key_written(path):
    with CheckpointStore(path):
        pass
    db = raw_db(path)
    try:
        assert db[b"format"] == FORMAT
    finally:
        db.close()


def test_latest_without_blob_reported(path):
    with CheckpointStore(path) as store:
        store.save(1, b"x", {})
    db = raw_db(path)
    db.delete(b"blob/" + b"1".zfill(20))
    db.close()
    with CheckpointStore(path) as store, pytest.raises(CheckpointStoreError, match="no blob"):
        store.load_latest()


def test_closed_store_raises(path):
    store = CheckpointStore(path)
    store.close()
    store.close()
    with pytest.raises(CheckpointStoreError, match="is closed"):
        store.load_latest()


def test_trainer_checkpoint_through_store(path):
    settings = Settings(data_dir=None, levels=2, clusters=4, hidden_size=8, batch_size=8)
    rng = random.Random(0)
    samples = [
        Sample(
            event_id=f"e{i}",
            user_id=i,
            session_id=i,
            time_ms=i,
            features=[rng.random() for _ in range(3)],
            actions=[[rng.randrange(4), 1.0]],
            level=i % 2,
            retention_score=rng.random(),
            gap_ms=0,
        )
        for i in range(64)
    ]
    original = Trainer(3, 4, settings)
    original.learn_many(samples[:32])
    with CheckpointStore(path) as store:
        store.save(1, original.checkpoint(), {"steps": original.steps})
    with CheckpointStore(path) as store:
        version, blob, meta = store.load_latest()
    restored = Trainer.restore(blob, settings)
    assert (version, meta) == (1, {"steps": 4})
    assert original.learn_many(samples[32:]) == restored.learn_many(samples[32:])


def test_altered_blob_rejected(path):
    with CheckpointStore(path) as store:
        store.save(1, b"original", {"steps": 1})
    db = raw_db(path)
    db[b"blob/" + b"1".zfill(20)] = b"origina1"
    db.close()
    with CheckpointStore(path) as store, pytest.raises(CheckpointStoreError, match="SHA-256"):
        store.load_latest()


def test_prune_removes_checksums(path):
    with CheckpointStore(path) as store:
        for version in range(1, 4):
            store.save(version, b"x", {})
        store.prune(keep=1)
    db = raw_db(path)
    try:
        keys = [bytes(key) for key in db.keys()]
    finally:
        db.close()
    assert [key for key in keys if key.startswith(b"sha256/")] == [b"sha256/" + b"3".zfill(20)]
