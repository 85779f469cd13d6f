"""The artifact store: stage outputs on ``file://`` or ``s3://`` storage, published with a verified manifest.

``store`` moves bytes (``open_store(uri)`` returns a ``FileStore`` or an ``S3Store``); ``manifest``
decides what a finished stage is (``publish`` writes ``manifest.json`` last, ``fetch`` verifies every
file, ``is_complete`` is what the operator asks before skipping a stage).
"""

from __future__ import annotations

from rlhf_api.artifacts.manifest import (
    MANIFEST_NAME,
    FileEntry,
    InvalidManifestError,
    Manifest,
    PublishResult,
    fetch,
    is_complete,
    library_versions,
    manifest_uri,
    publish,
    read_manifest,
)
from rlhf_api.artifacts.progress import PROGRESS_NAME, Progress, publish_progress, read_progress
from rlhf_api.artifacts.store import (
    ChecksumError,
    FileStore,
    NotFoundError,
    ObjectInfo,
    S3Store,
    StorageOptions,
    Store,
    StoreError,
    UnsafePathError,
    download_tree,
    join_uri,
    open_store,
    safe_relative_path,
    sha256_file,
)

__all__ = [
    "MANIFEST_NAME",
    "PROGRESS_NAME",
    "Progress",
    "publish_progress",
    "read_progress",
    "ChecksumError",
    "FileEntry",
    "FileStore",
    "InvalidManifestError",
    "Manifest",
    "NotFoundError",
    "ObjectInfo",
    "PublishResult",
    "S3Store",
    "StorageOptions",
    "Store",
    "StoreError",
    "UnsafePathError",
    "download_tree",
    "fetch",
    "is_complete",
    "join_uri",
    "library_versions",
    "manifest_uri",
    "open_store",
    "publish",
    "read_manifest",
    "safe_relative_path",
    "sha256_file",
]
