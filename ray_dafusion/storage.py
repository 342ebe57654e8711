"""URIs to filesystems, atomic writes and completion markers.

Every stage reads and writes through this module, so local paths, ``file://`` and ``s3://``
behave the same. S3-compatible endpoints come from ``endpoint_url`` (a config field) or the
standard ``AWS_ENDPOINT_URL``; credentials come from the standard AWS chain and are never
logged. An output directory counts as complete only once its ``manifest.json`` exists, and
the manifest is always the last thing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from typing import Any, Optional
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError",
    "MANIFEST",
    "resolve",
    "join",
    "is_s3",
    "exists",
    "read_bytes",
    "write_bytes",
    "read_json",
    "write_json",
    "list_files",
    "list_dirs",
    "parquet_files",
    "delete",
    "write_parquet",
    "read_parquet",
    "download_dir",
    "upload_dir",
    "read_manifest",
    "write_manifest",
    "ensure_fresh_output",
    "fingerprint",
    "sha256_bytes",
    "total_size",
    "fsspec_options",
]

MANIFEST = "manifest.json"


class StorageError(OSError):
    """A URI cannot be used: bad scheme, missing bucket, no credentials, ..."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _endpoint(endpoint_url: Optional[str]) -> Optional[str]:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_S3_CACHE: dict[Optional[str], pafs.S3FileSystem] = {}


def _s3(endpoint_url: Optional[str]) -> pafs.S3FileSystem:
    endpoint = _endpoint(endpoint_url)
    if endpoint not in _S3_CACHE:
        kwargs: dict[str, Any] = {}
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
            # Custom endpoints (MinIO, moto) take path-style addressing and one region.
            kwargs["force_virtual_addressing"] = False
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        elif endpoint:
            kwargs["region"] = "us-east-1"
        try:
            _S3_CACHE[endpoint] = pafs.S3FileSystem(**kwargs)
        except Exception as exc:  # pyarrow raises several types here
            raise StorageError(f"cannot set up S3 access (endpoint {endpoint or 'AWS'}): {exc}") from None
    return _S3_CACHE[endpoint]


def resolve(uri: str, endpoint_url: Optional[str] = None) -> tuple[pafs.FileSystem, str]:
    """Return (pyarrow filesystem, path inside it) for a local path, file:// or s3:// URI."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"empty or non-string URI: {uri!r}")
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/")
        if not path or path.startswith("/"):
            raise StorageError(f"S3 URI needs a bucket: {uri!r} (expected s3://bucket/prefix)")
        return _s3(endpoint_url), path
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(uri[len("file://"):])
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme '{scheme}://' in {uri!r}; use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (keeps the scheme)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _wrap(uri: str, exc: Exception) -> Exception:
    if isinstance(exc, FileNotFoundError):
        return exc
    text = str(exc)
    if "AWS Error ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "credentials" in text.lower():
        return StorageError(f"S3 refused access to {uri}: check the AWS credentials and permissions ({text.splitlines()[0]})")
    if "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        return StorageError(f"S3 bucket of {uri} does not exist")
    return StorageError(f"storage error on {uri}: {text.splitlines()[0] if text else type(exc).__name__}")


def _info(uri: str, endpoint_url: Optional[str]) -> pafs.FileInfo:
    fs, path = resolve(uri, endpoint_url)
    try:
        return fs.get_file_info(path)
    except Exception as exc:
        raise _wrap(uri, exc) from None


def exists(uri: str, endpoint_url: Optional[str] = None) -> bool:
    return _info(uri, endpoint_url).type != pafs.FileType.NotFound




def read_bytes(uri: str, endpoint_url: Optional[str] = None) -> bytes:
    fs, path = resolve(uri, endpoint_url)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None
    except Exception as exc:
        if "not found" in str(exc).lower() or "NoSuchKey" in str(exc):
            raise FileNotFoundError(f"no such file: {uri}") from None
        raise _wrap(uri, exc) from None


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path) if "/" in path else ("", path)
    return posixpath.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


def write_bytes(uri: str, data: bytes, endpoint_url: Optional[str] = None) -> None:
    """Write a whole file atomically: readers see the old file, nothing, or the new file."""
    fs, path = resolve(uri, endpoint_url)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = _tmp_name(path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # an S3 PUT becomes visible whole or not at all
            with fs.open_output_stream(path) as f:
                f.write(data)
    except Exception as exc:
        raise _wrap(uri, exc) from None


def read_json(uri: str, endpoint_url: Optional[str] = None) -> Any:
    return json.loads(read_bytes(uri, endpoint_url).decode("utf-8"))


def write_json(uri: str, obj: Any, endpoint_url: Optional[str] = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), endpoint_url)


def list_files(uri: str, suffix: str = "", endpoint_url: Optional[str] = None, recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under `uri` ending in `suffix` (hidden and temp files excluded)."""
    fs, path = resolve(uri, endpoint_url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    out = []
    for info in infos:
        name = posixpath.basename(info.path)
        if info.type != pafs.FileType.File or name.startswith((".", "_")) or not name.endswith(suffix):
            continue
        rel = posixpath.relpath(info.path, path) if recursive else name
        out.append(join(uri, rel))
    return sorted(out)


def delete(uri: str, endpoint_url: Optional[str] = None) -> None:
    """Remove a file or a directory tree; missing is fine."""
    fs, path = resolve(uri, endpoint_url)
    info = fs.get_file_info(path)
    try:
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except Exception as exc:
        raise _wrap(uri, exc) from None


def write_parquet(table: pa.Table, uri: str, endpoint_url: Optional[str] = None) -> None:
    """Write one parquet file atomically (schema metadata included)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes(), endpoint_url)


def read_parquet(uri: str, endpoint_url: Optional[str] = None, columns: Optional[list[str]] = None) -> pa.Table:
    """Read one parquet file, or every *.parquet file under a directory, as one table."""
    fs, path = resolve(uri, endpoint_url)
    files = [uri] if uri.endswith(".parquet") else list_files(uri, ".parquet", endpoint_url, recursive=True)
    tables = []
    for f in files:
        _, p = resolve(f, endpoint_url)
        try:
            tables.append(pq.read_table(p, filesystem=fs, columns=columns))
        except Exception as exc:
            raise _wrap(f, exc) from None
    if not tables:
        raise FileNotFoundError(f"no parquet files under {uri}")
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def download_dir(uri: str, local_dir: str, endpoint_url: Optional[str] = None) -> None:
    """Copy every file under `uri` into `local_dir` (used to stage models from S3)."""
    fs, path = resolve(uri, endpoint_url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"nothing to copy under {uri}")
    for info in files:
        rel = posixpath.relpath(info.path, path)
        dest = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        pafs.copy_files(info.path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def upload_dir(local_dir: str, uri: str, endpoint_url: Optional[str] = None) -> None:
    """Copy a local directory tree to `uri`."""
    fs, path = resolve(uri, endpoint_url)
    for root, _, names in os.walk(local_dir):
        for name in names:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            write_bytes(join(uri, rel), open(src, "rb").read(), endpoint_url)


# ---- manifests: the completion marker of every stage output ---------------------------


def read_manifest(uri: str, endpoint_url: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The manifest of an output directory, or None when the output is not complete."""
    try:
        return read_json(join(uri, MANIFEST), endpoint_url)
    except FileNotFoundError:
        return None


def write_manifest(uri: str, manifest: dict[str, Any], endpoint_url: Optional[str] = None) -> None:
    """Mark an output complete. Call only after every other file of the output is written."""
    manifest = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
    write_json(join(uri, MANIFEST), manifest, endpoint_url)


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (configs, class tables)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fsspec_options(endpoint_url: Optional[str] = None) -> dict[str, Any]:
    """storage_options for fsspec/s3fs readers (pandas, datasets) pointing at the same endpoint."""
    endpoint = _endpoint(endpoint_url)
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def parquet_files(uri: str, endpoint_url: Optional[str] = None) -> list[str]:
    return list_files(uri, ".parquet", endpoint_url, recursive=True)


def ensure_fresh_output(
    uri: str,
    stage: str,
    config_fp: str,
    overwrite: bool,
    endpoint_url: Optional[str] = None,
) -> Optional[dict[str, Any]]:
    """Decide what to do with an existing output before a stage writes to it.

    Returns the manifest when the output is complete and was made with the same config (the
    stage can skip). Raises when it holds another config's output, unless `overwrite`, in which
    case it is deleted. Partial output of the same config is left for the stage to resume.
    A small ``_run.json`` records the config fingerprint at the start of a run.
    """
    manifest = read_manifest(uri, endpoint_url)
    run_uri = join(uri, "_run.json")
    try:
        run = read_json(run_uri, endpoint_url)
    except FileNotFoundError:
        run = None
    previous = (manifest or {}).get("config_fingerprint") or (run or {}).get("config_fingerprint")
    if previous is not None and previous != config_fp:
        if not overwrite:
            raise StorageError(
                f"{uri} already holds {stage} output made with a different config "
                f"(fingerprint {previous}, now {config_fp}); choose another output or set overwrite: true"
            )
        delete(uri, endpoint_url)
        manifest = None
    elif previous is None and exists(uri, endpoint_url) and list_files(uri, "", endpoint_url, recursive=True):
        if not overwrite:
            raise StorageError(
                f"{uri} is not empty and holds no {stage} run record; choose another output or set overwrite: true"
            )
        delete(uri, endpoint_url)
    if manifest is not None:
        return manifest
    write_json(run_uri, {"stage": stage, "config_fingerprint": config_fp}, endpoint_url)
    return None


def list_dirs(uri: str, endpoint_url: Optional[str] = None) -> list[str]:
    fs, path = resolve(uri, endpoint_url)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def total_size(uris: list[str], endpoint_url: Optional[str] = None) -> int:
    """Bytes in the files `uris` (one metadata request per filesystem)."""
    if not uris:
        return 0
    fs, _ = resolve(uris[0], endpoint_url)
    try:
        infos = fs.get_file_info([resolve(u, endpoint_url)[1] for u in uris])
    except Exception as exc:
        raise _wrap(uris[0], exc) from None
    return sum(max(i.size or 0, 0) for i in infos)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

