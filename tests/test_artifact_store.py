"""The artifact store and stage manifests, on a file:// directory and on a real S3 server process.

No S3 mocks: the ``s3`` backend talks HTTP to the server started by ``tests/s3_server.py``. Expected
digests are computed here with ``hashlib`` directly, never with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from s3_server import S3Server

from rlhf_api.artifacts import (
    MANIFEST_NAME,
    ChecksumError,
    InvalidManifestError,
    NotFoundError,
    Progress,
    S3Store,
    StorageOptions,
    Store,
    StoreError,
    UnsafePathError,
    download_tree,
    fetch,
    is_complete,
    join_uri,
    library_versions,
    open_store,
    publish,
    publish_progress,
    read_manifest,
    read_progress,
)
from rlhf_api.artifacts import store as store_module
from rlhf_api.artifacts.checkpoints import CheckpointPointer, pointer_uri, read_pointer

pytestmark = pytest.mark.timeout(60)

DIGEST = "sha256:cfg-1"
BINARY = bytes(range(256)) * 64 + b"\x00\xff\r\n"

#: The stage output every test publishes: nested dirs, binary content, an empty file.
TREE = {
    "model.safetensors": BINARY,
    "config.json": b'{"hidden_size": 8}\n',
    "tokenizer/vocab.txt": "a\nb\nc\n\u00e9\u00e8\n".encode(),
    "tokenizer/deep/nested/merges.bin": os.urandom(3000),
    "empty.txt": b"",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Backend:
    """A store, a fresh stage-directory URI in it, and ways to tamper with stored objects behind it."""

    name: str
    store: Store
    uri: str
    server: S3Server | None = None

    def overwrite(self, rel: str, data: bytes) -> None:
        """Replace a stored object's bytes behind the store's back (on S3 keeping its sha256 metadata)."""
        uri = join_uri(self.uri, rel)
        if self.server is None:
            Path(uri.removeprefix("file://")).write_bytes(data)
            return
        client = self.server.client()
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        metadata = client.head_object(Bucket=bucket, Key=key)["Metadata"]
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)

    def flip_byte(self, rel: str, data: bytes, offset: int = 10) -> bytes:
        """Corrupt one byte of the stored object ``rel`` (whose content is ``data``); return the new bytes."""
        corrupted = bytearray(data)
        corrupted[offset] ^= 0xFF
        self.overwrite(rel, bytes(corrupted))
        return bytes(corrupted)

    def remove(self, rel: str) -> None:
        """Delete a stored object behind the store's back."""
        uri = join_uri(self.uri, rel)
        if self.server is None:
            Path(uri.removeprefix("file://")).unlink()
            return
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        self.server.client().delete_object(Bucket=bucket, Key=key)


def s3_options(server: S3Server) -> StorageOptions:
    return StorageOptions(endpoint=server.endpoint, region=server.region)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        uri = f"file://{tmp_path / 'storage'}/ns/pipe/ab12/sft"
        return Backend("file", open_store(uri), uri)
    return request.getfixturevalue("s3_backend")


@pytest.fixture
def s3_backend(request: pytest.FixtureRequest) -> Backend:
    server: S3Server = request.getfixturevalue("s3_server")
    bucket_uri: str = request.getfixturevalue("s3_env")
    uri = join_uri(bucket_uri, "ns/pipe/ab12/sft")
    store = open_store(uri, s3_options(server))
    assert isinstance(store, S3Store)
    return Backend("s3", store, uri, server)


@pytest.fixture
def stage_dir(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "out", TREE)


# ------------------------------------------------------------------------------------------- store


def test_join_uri() -> None:
    assert join_uri("s3://b/run/", "sft", "/a/b.json") == "s3://b/run/sft/a/b.json"
    assert join_uri("file:///data", "", "x") == "file:///data/x"


def test_store_basics(backend: Backend, tmp_path: Path) -> None:
    store, base = backend.store, backend.uri
    assert not store.exists(join_uri(base, "a.txt"))
    store.write_bytes(join_uri(base, "a.txt"), b"one")
    store.write_bytes(join_uri(base, "sub/b.txt"), b"three")
    # a sibling whose name extends the prefix is not "under" it
    store.write_bytes(base + "2/c.txt", b"x")
    assert store.exists(join_uri(base, "a.txt"))
    assert store.read_bytes(join_uri(base, "sub/b.txt")) == b"three"
    assert [(i.uri, i.size) for i in store.list(base)] == [
        (join_uri(base, "a.txt"), 3),
        (join_uri(base, "sub/b.txt"), 5),
    ]
    with pytest.raises(NotFoundError, match="missing"):
        store.read_bytes(join_uri(base, "missing"))
    with pytest.raises(NotFoundError):
        store.download_file(join_uri(base, "missing"), tmp_path / "dl" / "missing")
    assert not (tmp_path / "dl" / "missing").exists()

    src = tmp_path / "up.bin"
    src.write_bytes(BINARY)
    store.upload_file(src, join_uri(base, "up.bin"), sha(BINARY))
    assert store.sha256(join_uri(base, "up.bin")) == sha(BINARY)
    store.download_file(join_uri(base, "up.bin"), tmp_path / "dl" / "up.bin")
    assert (tmp_path / "dl" / "up.bin").read_bytes() == BINARY
    assert os.listdir(tmp_path / "dl") == ["up.bin"]  # no temporary files left

    assert store.delete_prefix(base) == 3
    assert store.list(base) == []
    assert store.read_bytes(base + "2/c.txt") == b"x"


def test_s3_upload_records_sha256_metadata(s3_backend: Backend, tmp_path: Path) -> None:
    backend = s3_backend
    assert backend.server is not None
    src = tmp_path / "f.bin"
    src.write_bytes(BINARY)
    backend.store.upload_file(src, join_uri(backend.uri, "f.bin"), sha(BINARY))
    bucket, key = join_uri(backend.uri, "f.bin").removeprefix("s3://").split("/", 1)
    head = backend.server.client().head_object(Bucket=bucket, Key=key)
    assert head["Metadata"] == {"sha256": sha(BINARY)}


def test_open_store_rejects_unknown_scheme() -> None:
    with pytest.raises(StoreError, match=r"'gs://x': unsupported storage URI.*s3://BUCKET.*file:///"):
        open_store("gs://x")
    with pytest.raises(StoreError, match="absolute path"):
        open_store("file://relative/dir")


def test_missing_bucket_is_named_and_not_mistaken_for_missing_object(
    s3_server: S3Server, s3_env: str, tmp_path: Path, stage_dir: Path
) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{bucket}/ns/pipe/sft"
    store = open_store(uri, s3_options(s3_server))
    attempts = {
        "read_manifest": lambda: read_manifest(uri, store),
        "is_complete": lambda: is_complete(uri, store),
        "exists": lambda: store.exists(join_uri(uri, "x")),
        "list": lambda: store.list(uri),
        "publish": lambda: publish(stage_dir, uri, store, stage="sft", config_digest=DIGEST),
        "fetch": lambda: fetch(uri, tmp_path / "in", store),
    }
    for name, attempt in attempts.items():
        with pytest.raises(StoreError) as info:
            attempt()
        message = str(info.value)
        assert not isinstance(info.value, NotFoundError), name
        assert f"bucket {bucket!r} does not exist" in message, name
        assert s3_server.endpoint in message, name
        assert s3_server.secret_key not in message and s3_server.access_key not in message, name


# ------------------------------------------------------------------------------------- manifests


def test_publish_then_fetch_roundtrip(backend: Backend, stage_dir: Path, tmp_path: Path) -> None:
    write_tree(stage_dir, {"checkpoints/step-10/state.bin": b"ckpt", MANIFEST_NAME: b"stale"})
    result = publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST, metrics={"loss": 0.5})
    assert sorted(result.uploaded) == sorted(TREE)
    assert result.skipped == []

    local = tmp_path / "fetched"
    manifest = fetch(backend.uri, local, backend.store)
    assert read_tree(local) == dict(sorted(TREE.items()))  # no checkpoints, no stale manifest
    assert manifest == result.manifest


def test_manifest_lists_every_file_with_size_and_sha256(backend: Backend, stage_dir: Path) -> None:
    metrics = {"loss": 0.25, "steps": 3}
    publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST, metrics=metrics)
    raw = json.loads(backend.store.read_bytes(join_uri(backend.uri, MANIFEST_NAME)))
    assert raw["format_version"] == 1
    assert raw["stage"] == "sft" and raw["config_digest"] == DIGEST
    assert raw["files"] == [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in sorted(TREE.items())]
    assert raw["metrics"] == {"loss": 0.25, "steps": 3}
    created = datetime.fromisoformat(raw["created_at"].replace("Z", "+00:00"))
    assert created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60
    assert read_manifest(backend.uri, backend.store).files[0].path == "config.json"


def test_library_versions_skips_missing() -> None:
    import pydantic

    assert library_versions(("pydantic", "no-such-distribution-rlhf")) == {"pydantic": pydantic.VERSION}


def test_republish_skips_unchanged_and_uploads_changed(backend: Backend, stage_dir: Path, tmp_path: Path) -> None:
    publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    again = publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    assert again.uploaded == []
    assert sorted(again.skipped) == sorted(TREE)

    changed = bytearray(BINARY)
    changed[0] ^= 1  # same size, different content: only the hash can tell
    (stage_dir / "model.safetensors").write_bytes(bytes(changed))
    third = publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    assert third.uploaded == ["model.safetensors"]
    assert sorted(third.skipped) == sorted(set(TREE) - {"model.safetensors"})
    fetch(backend.uri, tmp_path / "fetched", backend.store)
    assert (tmp_path / "fetched" / "model.safetensors").read_bytes() == bytes(changed)


def test_corrupt_object_raises_checksum_error_and_leaves_no_copy(
    backend: Backend, stage_dir: Path, tmp_path: Path
) -> None:
    publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    corrupted = backend.flip_byte("tokenizer/deep/nested/merges.bin", TREE["tokenizer/deep/nested/merges.bin"])
    local = tmp_path / "fetched"
    # a stale local copy with the wrong content must not survive either
    write_tree(local, {"tokenizer/deep/nested/merges.bin": b"stale"})
    with pytest.raises(ChecksumError) as info:
        fetch(backend.uri, local, backend.store)
    message = str(info.value)
    assert "tokenizer/deep/nested/merges.bin" in message
    assert sha(TREE["tokenizer/deep/nested/merges.bin"]) in message and sha(corrupted) in message
    leftovers = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "tokenizer/deep/nested/merges.bin" not in leftovers
    assert not any(".rlhf-tmp-" in p for p in leftovers)
    assert leftovers <= set(TREE)


def test_truncated_object_raises_checksum_error(backend: Backend, stage_dir: Path, tmp_path: Path) -> None:
    publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    backend.overwrite("config.json", TREE["config.json"][:5])
    with pytest.raises(ChecksumError, match=f"config.json: .* has 5 bytes but .* lists {len(TREE['config.json'])}"):
        fetch(backend.uri, tmp_path / "fetched", backend.store)
    assert not (tmp_path / "fetched" / "config.json").exists()


def test_fetch_needs_a_manifest(backend: Backend, tmp_path: Path) -> None:
    backend.store.write_bytes(join_uri(backend.uri, "model.safetensors"), b"half-written stage")
    with pytest.raises(NotFoundError, match="no manifest at .*has not finished"):
        fetch(backend.uri, tmp_path / "fetched", backend.store)
    assert not (tmp_path / "fetched" / "model.safetensors").exists()


def test_fetch_uses_only_listed_files(backend: Backend, stage_dir: Path, tmp_path: Path) -> None:
    publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    backend.store.write_bytes(join_uri(backend.uri, "leftover-from-attempt-1.bin"), b"old")
    fetch(backend.uri, tmp_path / "fetched", backend.store)
    assert set(read_tree(tmp_path / "fetched")) == set(TREE)


def test_progress_is_read_back_for_its_config_digest_only(backend: Backend, stage_dir: Path) -> None:
    store, uri = backend.store, backend.uri
    assert read_progress(uri, store, DIGEST) is None  # nothing published yet
    publish_progress(uri, store, DIGEST, Progress(step=3, total_steps=10,
                                                  metrics={"rm_score": 1.25, "kl": float("nan")}))
    got = read_progress(uri, store, DIGEST)
    assert got == Progress(step=3, total_steps=10, metrics={"rm_score": 1.25})  # NaN is not JSON: left out
    assert read_progress(uri, store, "sha256:other") is None  # a leftover of another configuration
    # advisory only: a published stage's manifest does not list it, and it does not make a stage complete
    assert not is_complete(uri, store)
    publish(stage_dir, uri, store, stage="sft", config_digest=DIGEST)
    assert "progress.json" not in {f.path for f in read_manifest(uri, store).files}
    store.write_bytes(join_uri(uri, "progress.json"), b'{"totalSteps": 4}')
    with pytest.raises(ValueError, match="progress.json"):
        read_progress(uri, store, DIGEST)


def test_is_complete_lifecycle(backend: Backend, stage_dir: Path) -> None:
    store, uri = backend.store, backend.uri
    assert not is_complete(uri, store)
    for rel, data in TREE.items():  # every file there, but no manifest yet
        store.write_bytes(join_uri(uri, rel), data)
    assert not is_complete(uri, store)

    publish(stage_dir, uri, store, stage="sft", config_digest=DIGEST)
    assert is_complete(uri, store)
    assert is_complete(uri, store, config_digest=DIGEST)
    assert is_complete(join_uri(uri, MANIFEST_NAME), store)
    assert not is_complete(uri, store, config_digest="sha256:other")

    backend.remove("tokenizer/vocab.txt")
    assert not is_complete(uri, store)
    assert is_complete(uri, store) is False


def test_is_complete_false_when_a_listed_file_changed_size(backend: Backend, stage_dir: Path) -> None:
    publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    backend.store.write_bytes(join_uri(backend.uri, "empty.txt"), b"no longer empty")
    assert not is_complete(backend.uri, backend.store)


def test_unparsable_manifest(backend: Backend) -> None:
    backend.store.write_bytes(join_uri(backend.uri, MANIFEST_NAME), b'{"stage": "sft", "files": [')
    with pytest.raises(InvalidManifestError, match=f"{backend.uri}/{MANIFEST_NAME} is not a valid manifest"):
        read_manifest(backend.uri, backend.store)
    assert not is_complete(backend.uri, backend.store)


def test_manifest_with_path_outside_stage_dir_is_rejected(backend: Backend, tmp_path: Path) -> None:
    evil = {
        "stage": "sft",
        "config_digest": DIGEST,
        "created_at": "2025-01-01T00:00:00Z",
        "files": [{"path": "../../escape.txt", "size": 1, "sha256": "0" * 64}],
    }
    backend.store.write_bytes(join_uri(backend.uri, MANIFEST_NAME), json.dumps(evil).encode())
    with pytest.raises(InvalidManifestError, match="files.0.path"):
        fetch(backend.uri, tmp_path / "a" / "b", backend.store)
    assert not (tmp_path / "escape.txt").exists()


def test_manifest_is_written_last(backend: Backend, stage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_upload = backend.store.upload_file
    calls = []

    def failing_second_upload(path: Path, uri: str, sha256: str) -> None:
        calls.append(uri)
        if len(calls) == 2:
            raise StoreError(f"cannot upload {uri}: connection reset")
        real_upload(path, uri, sha256)

    monkeypatch.setattr(backend.store, "upload_file", failing_second_upload)
    with pytest.raises(StoreError, match="connection reset"):
        publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    assert len(calls) == 2
    assert not backend.store.exists(join_uri(backend.uri, MANIFEST_NAME))
    assert read_manifest(backend.uri, backend.store) is None
    assert not is_complete(backend.uri, backend.store)


def test_failed_republish_invalidates_the_old_manifest(
    backend: Backend, stage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    assert is_complete(backend.uri, backend.store)
    (stage_dir / "config.json").write_bytes(b'{"hidden_size": 16}\n')
    vanishing = stage_dir / "zz-vanishing.bin"
    vanishing.write_bytes(b"here while hashed")

    real_upload = backend.store.upload_file

    def upload_then_lose_file(path: Path, uri: str, sha256: str) -> None:
        real_upload(path, uri, sha256)
        vanishing.unlink(missing_ok=True)  # the next file disappears mid-publish

    monkeypatch.setattr(backend.store, "upload_file", upload_then_lose_file)
    with pytest.raises(StoreError, match="zz-vanishing.bin.*does not exist"):
        publish(stage_dir, backend.uri, backend.store, stage="sft", config_digest=DIGEST)
    assert read_manifest(backend.uri, backend.store) is None
    assert not is_complete(backend.uri, backend.store)


def test_large_file_multipart_roundtrip(s3_backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = s3_backend
    assert backend.server is not None
    monkeypatch.setattr(store_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(store_module, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)  # the S3 minimum part size
    store = S3Store(s3_options(backend.server))
    big = os.urandom(20 * 1024 * 1024 + 123)
    write_tree(tmp_path / "out", {"big.bin": big})
    publish(tmp_path / "out", backend.uri, store, stage="sft", config_digest=DIGEST)

    bucket, key = join_uri(backend.uri, "big.bin").removeprefix("s3://").split("/", 1)
    head = backend.server.client().head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-5")  # a multipart upload of 5 parts
    assert head["Metadata"]["sha256"] == sha(big)

    fetch(backend.uri, tmp_path / "fetched", store)
    assert sha((tmp_path / "fetched" / "big.bin").read_bytes()) == sha(big)


# ------------------------------------------------------------------------------------------ path traversal
def put_raw(backend: Backend, key_under_uri: str, data: bytes) -> str:
    """Store ``data`` under ``<backend.uri>/<key_under_uri>`` verbatim (no normalisation by the store under test);
    returns the raw key (S3) or path (file) it wrote."""
    if backend.server is None:
        path = Path(backend.uri.removeprefix("file://") + "/" + key_under_uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)
    bucket, key = backend.uri.removeprefix("s3://").split("/", 1)
    backend.server.client().put_object(Bucket=bucket, Key=f"{key}/{key_under_uri}", Body=data)
    return f"{key}/{key_under_uri}"


def test_download_tree_keeps_each_key_under_the_local_folder(backend: Backend, tmp_path: Path) -> None:
    for rel, data in TREE.items():
        put_raw(backend, rel, data)
    paths = download_tree(backend.uri, tmp_path / "in", backend.store)
    assert read_tree(tmp_path / "in") == TREE and len(paths) == len(TREE)


@pytest.fixture
def hostile_keys_backend(moto_s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """A bucket on moto's server, which stores keys such as ``a/../../b`` as AWS S3 does (MinIO refuses them)."""
    for name, value in (("AWS_ACCESS_KEY_ID", moto_s3_server.access_key),
                        ("AWS_SECRET_ACCESS_KEY", moto_s3_server.secret_key),
                        ("AWS_CONFIG_FILE", os.devnull), ("AWS_SHARED_CREDENTIALS_FILE", os.devnull)):
        monkeypatch.setenv(name, value)
    uri = join_uri(moto_s3_server.make_bucket(f"rlhf-test-{uuid.uuid4().hex[:16]}"), "ns/pipe/ab12/model")
    return Backend("s3", open_store(uri, s3_options(moto_s3_server)), uri, moto_s3_server)


@pytest.mark.parametrize("evil", ["../../escape.txt", "a/../../../escape.txt", "sub/../../escape.txt"])
def test_download_tree_refuses_a_key_that_escapes_the_local_folder(hostile_keys_backend: Backend, tmp_path: Path,
                                                                    evil: str) -> None:
    """An input without a manifest is every object under its prefix; a key whose rest is ``../../x`` would be
    written outside the workspace. Nothing is downloaded and the error names the key."""
    backend = hostile_keys_backend
    put_raw(backend, "ok.txt", b"fine")
    key = put_raw(backend, evil, b"owned")
    assert any(info.uri.endswith(evil) for info in backend.store.list(backend.uri))  # stored as written
    local = tmp_path / "work" / "inputs" / "model"
    with pytest.raises(UnsafePathError, match="refusing to download") as refused:
        download_tree(backend.uri, local, backend.store)
    assert key in str(refused.value)
    assert not list(tmp_path.rglob("escape.txt")) and not (local / "ok.txt").exists()


@pytest.mark.parametrize("evil", ["../../../../escape", "/tmp/escape", "checkpoint-1/../../x", "checkpoint-1/x",
                                  "..", ""])
def test_checkpoint_pointer_naming_a_path_is_refused(backend: Backend, evil: str) -> None:
    """latest.json's ``checkpoint`` is joined onto the local checkpoints folder and the store URI: only a folder
    name ``checkpoint-<step>`` is accepted; anything else is refused with the value named."""
    pointer = {"checkpoint": evil, "global_step": 3, "config_digest": DIGEST, "processes": 1}
    backend.store.write_bytes(pointer_uri(backend.uri), json.dumps(pointer).encode())
    with pytest.raises(UnsafePathError, match="refusing its checkpoint") as refused:
        read_pointer(backend.uri, backend.store, DIGEST)
    assert repr(evil) in str(refused.value) and isinstance(refused.value, ValueError)


def test_checkpoint_pointer_naming_a_checkpoint_is_read(backend: Backend) -> None:
    pointer = {"checkpoint": "checkpoint-40", "global_step": 40, "config_digest": DIGEST, "processes": 2}
    backend.store.write_bytes(pointer_uri(backend.uri), json.dumps(pointer).encode())
    assert read_pointer(backend.uri, backend.store, DIGEST) == CheckpointPointer("checkpoint-40", 40, DIGEST, 2)
