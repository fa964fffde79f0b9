"""Versioned trainer checkpoints in a RocksDB folder.

Layout (raw byte keys, so the folder reads the same from any RocksDB client):

- ``format``: ``FORMAT`` below. A folder with any other value, or with data but no such key,
  is rejected instead of being reused.
- ``blob/<version>`` and ``meta/<version>``: the checkpoint bytes and a JSON object of metadata.
  Versions are zero-padded to 20 digits, so key order is version order.
- ``sha256/<version>``: hex SHA-256 of the blob and the metadata bytes, checked on every load.
- ``latest``: the newest version, as decimal text.

:meth:`CheckpointStore.save` writes blob, metadata and the ``latest`` pointer in one
``WriteBatch``, which RocksDB applies atomically, so after a crash ``latest`` names a complete
checkpoint or the previous one. The batch is written with ``sync`` so a saved checkpoint also
survives a power loss. The checksum catches what the batch cannot: bytes altered on disk or by
another program after they were written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from types import TracebackType
from typing import Any

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

__all__ = ["FORMAT", "CheckpointFormatError", "CheckpointStore", "CheckpointStoreError"]

logger = logging.getLogger(__name__)

FORMAT = b"sec-online-checkpoints/2"
_FORMAT_KEY = b"format"
_LATEST_KEY = b"latest"
_BLOB_PREFIX = b"blob/"
_META_PREFIX = b"meta/"
_SHA256_PREFIX = b"sha256/"
_VERSION_DIGITS = 20


class CheckpointStoreError(RuntimeError):
    """The checkpoint folder is inconsistent, for example ``latest`` names a missing blob."""


class CheckpointFormatError(CheckpointStoreError):
    """The folder contains data of another format than ``FORMAT``."""


class CheckpointStore:
    """Checkpoints of the trainer, one per version, in a RocksDB folder.

    Parameters
    ----------
    path
        Folder of the database, created if missing.

    Raises
    ------
    CheckpointFormatError
        When the folder contains data of another format.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(self.path), options=Options(raw_mode=True))
        try:
            self._check_format()
        except CheckpointStoreError:
            self._db.close()
            raise
        self._closed = False

    def save(self, version: int, blob: bytes, meta: dict[str, Any]) -> None:
        """Store a checkpoint and make it the latest, atomically.

        Parameters
        ----------
        version
            Policy version of the checkpoint, greater than the latest saved one.
        blob
            Checkpoint bytes, for example ``Trainer.checkpoint()``.
        meta
            JSON-serialisable metadata stored beside the blob.
        """
        self._check_open()
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be a non-negative int, got {version!r}")
        latest = self._latest_version()
        if latest is not None and version <= latest:
            raise ValueError(
                f"checkpoint version {version} is not newer than the latest saved version "
                f"{latest} in {self.path}"
            )
        try:
            meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint metadata is not JSON-serialisable: {exc}") from exc
        batch = WriteBatch(raw_mode=True)
        batch.put(_key(_BLOB_PREFIX, version), bytes(blob))
        batch.put(_key(_META_PREFIX, version), meta_bytes)
        batch.put(_key(_SHA256_PREFIX, version), _digest(bytes(blob), meta_bytes))
        batch.put(_LATEST_KEY, str(version).encode())
        self._db.write(batch, write_opt=_synced())
        logger.debug("saved checkpoint version=%d bytes=%d path=%s", version, len(blob), self.path)

    def load_latest(self) -> tuple[int, bytes, dict[str, Any]] | None:
        """Return ``(version, blob, meta)`` of the latest checkpoint, or ``None`` if empty."""
        self._check_open()
        version = self._latest_version()
        if version is None:
            return None
        blob = self._db.get(_key(_BLOB_PREFIX, version))
        meta = self._db.get(_key(_META_PREFIX, version))
        digest = self._db.get(_key(_SHA256_PREFIX, version))
        if blob is None or meta is None or digest is None:
            raise CheckpointStoreError(
                f"latest checkpoint version {version} in {self.path} has no blob, metadata or "
                "checksum, so the folder was modified outside CheckpointStore. Move it away to "
                "start fresh"
            )
        blob, meta = bytes(blob), bytes(meta)
        if _digest(blob, meta) != bytes(digest):
            raise CheckpointStoreError(
                f"checkpoint version {version} in {self.path} does not match its SHA-256, so its "
                "bytes were altered after they were written. Move the folder away to start fresh"
            )
        return version, blob, json.loads(meta)

    def versions(self) -> list[int]:
        """Saved versions, ascending."""
        self._check_open()
        found = []
        for key in self._db.keys(from_key=_BLOB_PREFIX):
            if not key.startswith(_BLOB_PREFIX):
                break
            found.append(int(key[len(_BLOB_PREFIX) :]))
        return found

    def prune(self, keep: int = 5) -> int:
        """Delete all but the newest ``keep`` versions and return how many were deleted."""
        self._check_open()
        if keep < 1:
            raise ValueError(f"keep must be at least 1 so the latest checkpoint stays, got {keep}")
        old = self.versions()[:-keep]
        if not old:
            return 0
        batch = WriteBatch(raw_mode=True)
        for version in old:
            batch.delete(_key(_BLOB_PREFIX, version))
            batch.delete(_key(_META_PREFIX, version))
            batch.delete(_key(_SHA256_PREFIX, version))
        self._db.write(batch, write_opt=_synced())
        logger.debug("pruned %d checkpoints path=%s", len(old), self.path)
        return len(old)

    def close(self) -> None:
        """Close the database. Later calls on this store raise ``CheckpointStoreError``."""
        if not self._closed:
            self._db.close()
            self._closed = True

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_format(self) -> None:
        found = self._db.get(_FORMAT_KEY)
        if found is None:
            if any(True for _ in self._db.keys()):
                raise CheckpointFormatError(
                    f"{self.path} contains data but no format key, so it is not a checkpoint "
                    "store of sec-online. Point SEC_WORK_DIR elsewhere or move the folder away"
                )
            self._db.put(_FORMAT_KEY, FORMAT, write_opt=_synced())
            return
        if bytes(found) != FORMAT:
            raise CheckpointFormatError(
                f"{self.path} has checkpoint format {bytes(found).decode(errors='replace')!r}, "
                f"expected {FORMAT.decode()!r}. Run the release that wrote it, or move the "
                "folder away to start fresh"
            )

    def _latest_version(self) -> int | None:
        raw = self._db.get(_LATEST_KEY)
        return None if raw is None else int(bytes(raw))

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointStoreError(f"checkpoint store {self.path} is closed")


def _key(prefix: bytes, version: int) -> bytes:
    return prefix + str(version).zfill(_VERSION_DIGITS).encode()


def _digest(blob: bytes, meta: bytes) -> bytes:
    # The blob's length goes first, so moving bytes between blob and metadata changes the hash.
    hasher = hashlib.sha256(len(blob).to_bytes(8, "big"))
    hasher.update(blob)
    hasher.update(meta)
    return hasher.hexdigest().encode()


def _synced() -> WriteOptions:
    options = WriteOptions()
    options.sync = True
    return options
