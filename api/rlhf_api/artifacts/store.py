"""Object storage behind one small interface: ``file://`` directories and ``s3://`` buckets.

Every method takes a full URI (``file:///abs/path/x`` or ``s3://bucket/key``), so a caller never
splits bucket from key or worries about which backend it has: ``open_store(uri)`` picks one from the
scheme and the same code runs on a laptop (``file://``) and in a cluster (S3, MinIO, Ceph...).

A "prefix" URI is treated as a directory: ``list("s3://b/run/sft")`` returns the objects under
``s3://b/run/sft/`` and never ``s3://b/run/sft2/...``.

Checksums: ``upload_file`` records the file's sha256 with the object (S3 object metadata ``sha256``).
``head`` and ``list`` return it where it is stored; a ``file://`` store keeps no sidecar, so there it is
``None`` and ``Store.sha256(uri)`` hashes the file when a caller needs it. ``S3Store.list`` does not call
``head_object`` per object, so its ``ObjectInfo.sha256`` is always ``None``; use ``head`` or ``sha256``.

S3 credentials come only from boto3's default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
a mounted profile, an IAM role...). Nothing here prints, logs or puts them into an exception.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

#: Files at least this large are transferred in parts of ``MULTIPART_CHUNKSIZE`` bytes.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
#: Parallel part transfers per file.
TRANSFER_MAX_CONCURRENCY = 8
#: Attempts per S3 request (botocore "adaptive" retry mode: backoff plus client-side rate limiting).
S3_MAX_ATTEMPTS = 10
#: The metadata key under which ``upload_file`` stores the sha256 (S3 returns it as ``x-amz-meta-sha256``).
SHA256_METADATA_KEY = "sha256"

ADDRESSING_STYLES = ("auto", "path", "virtual")
_HASH_BLOCK = 1024 * 1024
#: Temporary files written next to their destination before an atomic rename carry this prefix.
TEMP_PREFIX = ".rlhf-tmp-"


class StoreError(Exception):
    """A storage operation failed; the message names the URI and says what to do."""


class NotFoundError(StoreError):
    """The object (or manifest) does not exist."""


class ChecksumError(StoreError):
    """A file's content does not match the sha256 (or size) its manifest lists."""


class UnsafePathError(StoreError, ValueError):
    """A stored key or pointer would place a file outside the local folder it is downloaded into (``..``, an
    absolute path, a backslash). The store's content is hostile or corrupt: never retried."""


def safe_relative_path(rel: str, source: str) -> str:
    """``rel`` when it is a relative ``/``-separated path that stays inside the folder it is joined onto: no
    empty, ``.`` or ``..`` part, not absolute, no backslash or NUL. ``UnsafePathError`` naming ``source`` (the
    key or pointer it came from) and ``rel`` otherwise."""
    if not rel or "\\" in rel or "\0" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise UnsafePathError(
            f"{source}: refusing to download it as {rel!r}: a stored key (or pointer) must be a relative path "
            "inside its folder, without '..', '.', empty parts, a leading '/' or a backslash; the store's content "
            "is corrupt or was written to escape the local folder: delete it"
        )
    return rel


@dataclass(frozen=True)
class StorageOptions:
    """How to reach an S3-compatible endpoint. Ignored by ``file://`` stores.

    Credentials are deliberately not here: they come from boto3's default chain.
    """

    endpoint: str | None = None
    """endpoint: optional. S3 API URL, e.g. ``http://minio.storage:9000``; ``None`` means AWS S3."""
    region: str | None = None
    """region: optional. Signing region; ``None`` means boto3's default (``AWS_DEFAULT_REGION``...)."""
    addressing_style: str = "auto"
    """addressingStyle: optional. ``path`` (``endpoint/bucket/key``, what MinIO wants), ``virtual``
    (``bucket.endpoint/key``) or ``auto`` (botocore decides)."""

    def __post_init__(self) -> None:
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ValueError(
                f"addressing_style {self.addressing_style!r} is not one of {', '.join(ADDRESSING_STYLES)}"
            )


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object."""

    uri: str
    """The object's full URI."""
    size: int
    """Size in bytes."""
    sha256: str | None
    """The sha256 recorded with the object, or ``None`` where none is recorded or it was not fetched."""


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of ``path``, read in 1 MiB blocks (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/``: ``join_uri("s3://b/run/", "sft", "a/b.json")`` is
    ``s3://b/run/sft/a/b.json``. Empty parts and surrounding slashes are dropped."""
    pieces = [base.rstrip("/")]
    pieces += [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def temp_sibling(path: Path) -> Path:
    """A unique temporary name in ``path``'s directory, so ``os.replace`` onto ``path`` is atomic."""
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


@contextlib.contextmanager
def local_target(uri: str, path: Path) -> Iterator[Path]:
    """A temporary sibling of the local file ``path`` to write ``uri``'s bytes into: renamed onto ``path`` when the
    block succeeds, removed otherwise, so ``path`` is never left half written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the directory {path.parent} for {uri}: {exc.strerror}") from exc
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write {path} for {uri}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)


class Store(abc.ABC):
    """Read and write objects addressed by full URIs. Every method raises ``StoreError`` (or a subclass)."""

    @abc.abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether an object exists at exactly ``uri`` (a "directory" is not an object)."""

    @abc.abstractmethod
    def head(self, uri: str) -> ObjectInfo:
        """Size and recorded sha256 of one object; ``NotFoundError`` when absent."""

    @abc.abstractmethod
    def read_bytes(self, uri: str) -> bytes:
        """The object's whole content; ``NotFoundError`` when absent."""

    @abc.abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Create or replace an object; readers see the old or the new content, never a mix."""

    @abc.abstractmethod
    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object under the directory ``prefix_uri``, recursively, sorted by URI."""

    @abc.abstractmethod
    def upload_file(self, path: Path, uri: str, sha256: str) -> None:
        """Copy a local file to ``uri``, recording ``sha256`` with it where the backend can."""

    @abc.abstractmethod
    def download_file(self, uri: str, path: Path) -> None:
        """Copy an object to ``path`` atomically (temporary file, then rename); creates parent dirs."""

    @abc.abstractmethod
    def delete(self, uri: str) -> None:
        """Delete one object; nothing happens when it does not exist."""

    @abc.abstractmethod
    def delete_prefix(self, prefix_uri: str) -> int:
        """Delete every object under the directory ``prefix_uri``; return how many were deleted."""

    def sha256(self, uri: str) -> str | None:
        """The object's sha256: the recorded one, or (``file://``) hashed from the file now.

        ``None`` when the backend has none recorded (an S3 object not written by ``upload_file``).
        """
        return self.head(uri).sha256


# ------------------------------------------------------------------------------------------ file://


class FileStore(Store):
    """``file:///absolute/path`` URIs on a local or mounted filesystem (a PVC, NFS...)."""

    @staticmethod
    def path_of(uri: str) -> Path:
        """The local path of a ``file://`` URI."""
        scheme, sep, rest = uri.partition("://")
        if scheme != "file" or not sep:
            raise StoreError(f"{uri!r} is not a file:// URI: the FileStore only handles file:///ABSOLUTE/PATH")
        if not rest.startswith("/"):
            raise StoreError(
                f"{uri!r}: a file:// URI needs an absolute path (three slashes), e.g. file:///data/artifacts"
            )
        return Path(rest)

    @staticmethod
    def uri_of(path: Path) -> str:
        """The ``file://`` URI of an absolute local path."""
        return "file://" + path.as_posix()

    def exists(self, uri: str) -> bool:
        return self.path_of(uri).is_file()

    def head(self, uri: str) -> ObjectInfo:
        path = self.path_of(uri)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{uri}: no such file") from None
        if not path.is_file():
            raise NotFoundError(f"{uri}: is a directory, not a file")
        return ObjectInfo(uri=uri, size=size, sha256=None)

    def sha256(self, uri: str) -> str | None:
        with self._reading(uri):
            return sha256_file(self.path_of(uri))

    def read_bytes(self, uri: str) -> bytes:
        with self._reading(uri):
            return self.path_of(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = self.path_of(uri)
        with local_target(uri, path) as tmp:
            tmp.write_bytes(data)

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        root = self.path_of(prefix_uri)
        if not root.is_dir():
            return []
        infos = []
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue  # an unfinished write, not an object
                path = Path(dirpath) / name
                uri = join_uri(prefix_uri, path.relative_to(root).as_posix())
                with contextlib.suppress(FileNotFoundError):  # deleted while we walked
                    infos.append(ObjectInfo(uri=uri, size=path.stat().st_size, sha256=None))
        return sorted(infos, key=lambda info: info.uri)

    def upload_file(self, path: Path, uri: str, sha256: str) -> None:
        # The sha256 is not stored (no sidecar files): ``sha256(uri)`` hashes the copy when asked.
        target = self.path_of(uri)
        with local_target(uri, target) as tmp:
            try:
                shutil.copyfile(path, tmp)
            except FileNotFoundError:
                raise StoreError(f"cannot upload {path} to {uri}: the local file does not exist") from None

    def download_file(self, uri: str, path: Path) -> None:
        source = self.path_of(uri)
        if not source.is_file():
            raise NotFoundError(f"{uri}: no such file")
        with local_target(uri, path) as tmp:
            try:
                shutil.copyfile(source, tmp)
            except FileNotFoundError:
                raise NotFoundError(f"{uri}: no such file") from None

    def delete(self, uri: str) -> None:
        try:
            self.path_of(uri).unlink(missing_ok=True)
        except IsADirectoryError:
            raise StoreError(f"cannot delete {uri}: it is a directory; use delete_prefix") from None
        except OSError as exc:
            raise StoreError(f"cannot delete {uri}: {exc.strerror}") from exc

    def delete_prefix(self, prefix_uri: str) -> int:
        root = self.path_of(prefix_uri)
        if not root.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(root))
        try:
            shutil.rmtree(root)
        except OSError as exc:
            raise StoreError(f"cannot delete {prefix_uri}: {exc.strerror}") from exc
        return count

    @staticmethod
    @contextlib.contextmanager
    def _reading(uri: str) -> Iterator[None]:
        """The OS's errors while reading ``uri`` as the store's: not found (no such file), or unreadable."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"{uri}: no such file") from None
        except OSError as exc:
            raise StoreError(f"cannot read {uri}: {exc.strerror}") from exc


# -------------------------------------------------------------------------------------------- s3://

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
}


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty."""
    scheme, sep, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not sep or not bucket:
        raise StoreError(f"{uri!r} is not an s3:// URI: use s3://BUCKET/KEY")
    return bucket, key


class S3Store(Store):
    """``s3://bucket/key`` URIs on AWS S3 or any S3-compatible server (MinIO, Ceph RGW, moto...).

    One store serves every bucket on its endpoint. Large files go through boto3's transfer manager
    (multipart above ``MULTIPART_THRESHOLD``, ``TRANSFER_MAX_CONCURRENCY`` parts in parallel).
    """

    def __init__(self, options: StorageOptions | None = None, credentials: tuple[str, str] | None = None) -> None:
        """``credentials`` (access key id, secret access key) override boto3's default chain; the operator
        passes those of the pipeline's Secret, trainer pods get theirs as environment variables."""
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.options = options or StorageOptions()
        config = Config(
            retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "adaptive"},
            s3={"addressing_style": self.options.addressing_style},
        )
        # Without explicit credentials, boto3.session.Session() resolves them through the default chain only.
        session = boto3.session.Session(*credentials) if credentials else boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=self.options.endpoint,
            region_name=self.options.region,
            config=config,
        )
        self._transfer_config: TransferConfig = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=TRANSFER_MAX_CONCURRENCY,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        self._buckets_seen: set[str] = set()

    @property
    def _endpoint_name(self) -> str:
        return self.options.endpoint or "AWS S3"

    # -- errors

    @contextlib.contextmanager
    def _errors(self, uri: str, action: str) -> Iterator[None]:
        """Translate botocore/boto3 exceptions into ``StoreError``s that name the URI and the fix.

        Messages carry the error code and the URI, never a request's headers or credentials.
        """
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        bucket, _ = split_s3_uri(uri)
        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, uri, bucket, action) from exc
        except S3UploadFailedError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(cause, uri, bucket, action) from exc
            raise StoreError(f"cannot {action} {uri}: the upload failed; retry it") from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(
                f"cannot {action} {uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (e.g. from the pipeline's storage secret) or give the pod an IAM role"
            ) from exc
        except BotoConnectionError as exc:
            raise StoreError(
                f"cannot {action} {uri}: the S3 endpoint {self._endpoint_name} for bucket {bucket!r} is "
                "unreachable; check storage.endpoint, the network path and that the server is running"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}") from exc

    def _client_error(self, exc: Any, uri: str, bucket: str, action: str) -> StoreError:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NO_BUCKET_CODES:
            return self._no_bucket_error(bucket, uri, action)
        if code in _NOT_FOUND_CODES:
            return NotFoundError(f"{uri}: no such object")
        if code in _DENIED_CODES:
            return StoreError(
                f"cannot {action} {uri}: access denied ({code}) by {self._endpoint_name}; check that the "
                f"credentials in the environment are valid and allowed to use bucket {bucket!r}"
            )
        return StoreError(f"cannot {action} {uri}: S3 error {code or 'unknown'} from {self._endpoint_name}")

    def _no_bucket_error(self, bucket: str, uri: str, action: str) -> StoreError:
        return StoreError(
            f"cannot {action} {uri}: bucket {bucket!r} does not exist at {self._endpoint_name}; create it "
            "(e.g. `aws s3 mb s3://" + bucket + "`) or fix the bucket in the storage URI"
        )

    def _not_found(self, uri: str, action: str) -> StoreError:
        """A 404 from HEAD does not say whether the key or the bucket is missing: ask about the bucket."""
        bucket, _ = split_s3_uri(uri)
        if bucket not in self._buckets_seen:
            try:
                with self._errors(uri, action):
                    self._client.head_bucket(Bucket=bucket)
            except NotFoundError:
                return self._no_bucket_error(bucket, uri, action)
            except StoreError as exc:
                return exc
            self._buckets_seen.add(bucket)
        return NotFoundError(f"{uri}: no such object")

    @staticmethod
    def _object_key(uri: str) -> tuple[str, str]:
        bucket, key = split_s3_uri(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri!r} names no object: use s3://BUCKET/KEY")
        return bucket, key

    @staticmethod
    def _dir_prefix(prefix_uri: str) -> tuple[str, str]:
        bucket, key = split_s3_uri(prefix_uri)
        key = key.strip("/")
        return bucket, f"{key}/" if key else ""

    # -- Store

    def exists(self, uri: str) -> bool:
        try:
            self.head(uri)
        except NotFoundError:
            return False
        return True

    def head(self, uri: str) -> ObjectInfo:
        bucket, key = self._object_key(uri)
        try:
            with self._errors(uri, "read"):
                response = self._client.head_object(Bucket=bucket, Key=key)
        except NotFoundError:
            raise self._not_found(uri, "read") from None
        self._buckets_seen.add(bucket)
        sha = response.get("Metadata", {}).get(SHA256_METADATA_KEY)
        return ObjectInfo(uri=uri, size=int(response["ContentLength"]), sha256=sha)

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = self._object_key(uri)
        with self._errors(uri, "read"):
            response = self._client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._object_key(uri)
        metadata = {SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()}
        with self._errors(uri, "write"):
            self._client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        bucket, prefix = self._dir_prefix(prefix_uri)
        infos = [
            ObjectInfo(uri=join_uri(prefix_uri, key[len(prefix) :]), size=size, sha256=None)
            for key, size in self._list_keys(prefix_uri, bucket, prefix)
        ]
        return sorted(infos, key=lambda info: info.uri)

    def _list_keys(self, prefix_uri: str, bucket: str, prefix: str) -> list[tuple[str, int]]:
        """``(key, size)`` of every object whose key starts with ``prefix``."""
        keys = []
        with self._errors(prefix_uri, "list"):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys += [(obj["Key"], int(obj["Size"])) for obj in page.get("Contents", [])]
        return keys

    def upload_file(self, path: Path, uri: str, sha256: str) -> None:
        from boto3.s3.transfer import create_transfer_manager

        bucket, key = self._object_key(uri)
        if not Path(path).is_file():
            raise StoreError(f"cannot upload {path} to {uri}: the local file does not exist")
        extra_args = {"Metadata": {SHA256_METADATA_KEY: sha256}}
        with self._errors(uri, "upload"), create_transfer_manager(self._client, self._transfer_config) as manager:
            manager.upload(os.fspath(path), bucket, key, extra_args=extra_args).result()

    def download_file(self, uri: str, path: Path) -> None:
        from boto3.s3.transfer import create_transfer_manager

        bucket, key = self._object_key(uri)
        with local_target(uri, Path(path)) as tmp:
            try:
                with self._errors(uri, "download"), create_transfer_manager(
                    self._client, self._transfer_config
                ) as manager:
                    manager.download(bucket, key, os.fspath(tmp)).result()
            except NotFoundError:
                raise self._not_found(uri, "download") from None

    def delete(self, uri: str) -> None:
        bucket, key = self._object_key(uri)
        with self._errors(uri, "delete"):
            self._client.delete_object(Bucket=bucket, Key=key)

    def delete_prefix(self, prefix_uri: str) -> int:
        bucket, prefix = self._dir_prefix(prefix_uri)
        keys = [key for key, _size in self._list_keys(prefix_uri, bucket, prefix)]
        with self._errors(prefix_uri, "delete"):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[start : start + 1000]]
                response = self._client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                if response.get("Errors"):
                    failed = response["Errors"][0]
                    raise StoreError(
                        f"cannot delete s3://{bucket}/{failed.get('Key')}: S3 error {failed.get('Code')}; "
                        f"{len(response['Errors'])} object(s) under {prefix_uri} were not deleted"
                    )
        return len(keys)


def download_tree(prefix_uri: str, local_dir: Path, store: Store) -> list[Path]:
    """Download every object under the directory ``prefix_uri`` into ``local_dir``, keeping the rest of each key
    as the relative path (the read of an input that has no manifest). Every key is checked first, so a key such as
    ``prefix/../../x`` or ``prefix//etc/x`` downloads nothing (``UnsafePathError`` naming it). Returns the paths."""
    prefix = prefix_uri.rstrip("/") + "/"
    local_dir = Path(local_dir)
    targets = []
    for info in store.list(prefix):
        if not info.uri.startswith(prefix):
            raise UnsafePathError(f"{info.uri}: listed under {prefix} but does not start with it")
        rel = safe_relative_path(info.uri[len(prefix):], info.uri)
        targets.append((info.uri, local_dir.joinpath(*rel.split("/"))))
    for uri, path in targets:
        store.download_file(uri, path)
    return [path for _, path in targets]


def open_store(uri: str, options: StorageOptions | None = None, credentials: tuple[str, str] | None = None) -> Store:
    """The store for ``uri``'s scheme: ``FileStore`` for ``file://``, ``S3Store`` for ``s3://`` (with
    ``credentials``, when given, instead of boto3's default chain)."""
    scheme, sep, _ = uri.partition("://")
    if sep and scheme == "file":
        FileStore.path_of(uri)  # rejects relative paths with a clear message
        return FileStore()
    if sep and scheme == "s3":
        split_s3_uri(uri)
        return S3Store(options, credentials)
    raise StoreError(
        f"{uri!r}: unsupported storage URI; artifacts can be stored under s3://BUCKET/PREFIX "
        "(AWS S3 or an S3-compatible server such as MinIO) or file:///ABSOLUTE/PATH"
    )
