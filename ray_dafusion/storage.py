"""URIs to filesystems, atomic writes and completion markers.

Every stage reads and writes through this module, so local paths, ``file://`` and ``s3://``
behave the same. S3-compatible endpoints come from ``endpoint_url`` (a config field) or the
standard ``AWS_ENDPOINT_URL``; credentials come from the standard AWS chain and are never
logged. An output directory counts as complete only once its ``manifest.json`` exists, and
the manifest is always the last thing written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError",
    "MANIFEST",
    "resolve",
    "join",
    "absolute",
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
    "ray_dataset",
    "download_dir",
    "upload_dir",
    "read_manifest",
    "write_manifest",
    "ensure_fresh_output",
    "delete_output",
    "remove_temp_files",
    "lease",
    "leased",
    "LeaseError",
    "fingerprint",
    "sha256_bytes",
    "total_size",
    "fsspec_options",
]

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


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
        # S3 keeps `.`, `..` and empty segments literally but the HTTP layer collapses them, so
        # s3://bkt/a/.. would address the bucket itself (a delete of it is a DeleteBucket).
        if any(part in ("", ".", "..") for part in path.split("/")):
            raise StorageError(f"S3 URI with an empty, '.' or '..' path segment: {uri!r}; write the key without them")
        return _s3(endpoint_url), path
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(uri[len("file://"):])
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme '{scheme}://' in {uri!r}; use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), absolute(uri)


def absolute(uri: str) -> str:
    """The URI with a local path made absolute, for processes that run in another directory (Ray
    Train workers run in their run's directory); a file:// URI keeps its scheme with its path made
    absolute as resolve() reads it, and s3:// URIs are returned as they are."""
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(uri[len("file://"):])
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


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
    # pyarrow names S3's error codes in upper snake case ("AWS Error INVALID_ACCESS_KEY_ID during ...")
    refused = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied", "InvalidAccessKeyId")
    if any(code in text for code in refused) or "credentials" in text.lower():
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


def list_files(uri: str, suffix: str = "", endpoint_url: Optional[str] = None, recursive: bool = False,
               skip_prefixes: tuple[str, ...] = (".", "_")) -> list[str]:
    """Sorted URIs of the files under `uri` ending in `suffix`, without those whose names, or the names
    of folders they are in below `uri`, start with one of `skip_prefixes`: by default hidden and temp
    files and folders (`.ipynb_checkpoints/`) and the `_` records stages and writers keep beside their
    data (`_run.json`, `_SUCCESS`, `_checkpoints/`); a user's own files are listed with (".",)."""
    fs, path = resolve(uri, endpoint_url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    out = []
    for info in infos:
        name = posixpath.basename(info.path)
        if info.type != pafs.FileType.File or not name.endswith(suffix):
            continue
        rel = posixpath.relpath(info.path, path) if recursive else name
        if any(part.startswith(skip_prefixes) for part in rel.split("/")):
            continue
        out.append(join(uri, rel))
    return sorted(out)


def delete(uri: str, endpoint_url: Optional[str] = None) -> None:
    """Remove a file or a directory tree; missing is fine."""
    fs, path = resolve(uri, endpoint_url)
    try:
        info = fs.get_file_info(path)
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


def ray_dataset(uris: list[str], columns: list[str], endpoint_url: Optional[str] = None):
    """A Ray Dataset over these parquet files (all on one filesystem), reading only `columns`.

    It reads through Ray Data's first parquet datasource, which starts no actors: the default one
    in Ray 2.60 starts a pool of 32 footer-reading actors for every read and kills it after, so on
    a small node each read started and ended several processes (two seeds of the digits sweep on
    2 cores: 26 footer readers and 34 workers that ran nothing, of 83; docs/benchmarks.md, "The
    sweep's parts"). That datasource samples a file as the dataset is made; its progress bar and
    size estimates are kept out of the log.
    """
    import ray.data

    fs, _ = resolve(uris[0], endpoint_url)
    paths = [resolve(u, endpoint_url)[1] for u in uris]
    context = ray.data.DataContext.get_current()
    sampling_log = logging.getLogger("ray.data._internal.datasource.parquet_datasource")
    saved = context.use_datasource_v2, context.enable_progress_bars, sampling_log.level
    context.use_datasource_v2 = context.enable_progress_bars = False
    sampling_log.setLevel(logging.WARNING)
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns)
    finally:
        context.use_datasource_v2, context.enable_progress_bars = saved[:2]
        sampling_log.setLevel(saved[2])
    ds.context.enable_progress_bars = saved[1]  # the dataset's own copy of the context: its run shows progress
    return ds


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


def listing(uri: str, endpoint_url: Optional[str] = None) -> list[list[Any]]:
    """[relative path, size, modification time in ns] of every file under `uri`, sorted: what
    changes when a file there is written again."""
    fs, path = resolve(uri, endpoint_url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    return sorted([posixpath.relpath(i.path, path), i.size, i.mtime_ns] for i in infos
                  if i.type == pafs.FileType.File)


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
    """Mark an output complete. Call only after every other file of the output is written. A driver
    whose lease on the output (or a folder above it) has passed to another driver does not: see
    `_Lease.confirm`."""
    for held in _leases_over(uri, endpoint_url):
        held.confirm()
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


RUN_RECORD = "_run.json"
LEASE = "_lease.json"


def _record_stage(manifest: Optional[dict[str, Any]], run: Optional[dict[str, Any]]) -> Optional[str]:
    return (manifest or {}).get("stage") or (run or {}).get("stage")


def _refuse_dangerous_delete(uri: str, stage: str) -> None:
    """Never delete a bucket, a filesystem root, the home directory or the directory the command
    runs in (or one above it), whatever the config says."""
    if is_s3(uri):
        if "/" not in uri[len("s3://"):].strip("/"):
            raise StorageError(f"refusing to delete the whole bucket {uri} for {stage} overwrite: use a prefix")
        return
    if "://" in uri and not uri.startswith("file://"):
        return
    path = os.path.realpath(resolve(uri)[1])
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if path in (os.path.sep, home) or cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep):
        raise StorageError(
            f"refusing to delete {uri} ({path}) for {stage} overwrite: it is the current directory, one above it, "
            "the home directory or the filesystem root; give the stage an output directory of its own"
        )


def _refuse_nested_outputs(uri: str, stage: str, endpoint_url: Optional[str]) -> None:
    """Never delete another stage's output nested inside this one (an invert output at real/tokens/
    inside an ingest output at real/). Score tables at <augment output>/scores/<scorer>/ belong to
    the augment output and go with it, unless a live driver is writing them (a score run beside
    an augment re-run with overwrite): a nested output whose lease lives is never deleted."""
    top = uri.rstrip("/")
    for f in list_files(uri, "", endpoint_url, recursive=True, skip_prefixes=()):
        parts = f[len(top) + 1:].split("/")
        if len(parts) >= 2 and parts[-1] == LEASE:
            holder = _read_lease(f, endpoint_url)
            if holder is not None and _holder_alive(holder, float(holder.get("ttl_seconds", 60.0))):
                raise LeaseError(f"refusing to delete {uri} for {stage} overwrite: "
                                 + _held_message(posixpath.dirname(f), holder))
            continue
        if len(parts) < 2 or parts[-1] not in (MANIFEST, RUN_RECORD):
            continue
        try:
            record = read_json(f, endpoint_url)
        except (FileNotFoundError, ValueError):  # gone meanwhile, or not a record of ours
            continue
        owner = record.get("stage") if isinstance(record, dict) else None
        if owner is None or owner == stage:
            continue
        if stage == "augment" and owner == "score" and len(parts) == 3 and parts[0] == "scores":
            continue
        raise StorageError(
            f"refusing to delete {uri} for {stage} overwrite: it holds a {owner} output at {posixpath.dirname(f)} "
            "(overwrite never deletes another stage's output); move that output elsewhere or choose another output"
        )


def ensure_fresh_output(
    uri: str,
    stage: str,
    config_fp: str,
    overwrite: bool,
    endpoint_url: Optional[str] = None,
    made_of: Optional[dict[str, Any]] = None,
) -> Optional[dict[str, Any]]:
    """Decide what to do with an existing output before a stage writes to it.

    Returns the manifest when the output is complete and was made with the same config (the
    stage can skip). Raises when it holds another config's output, unless `overwrite`, in which
    case it is deleted: only a directory whose record says this stage wrote it, never another
    stage's output, an unrelated directory, the current directory or a bucket. Partial output of
    the same config is left for the stage to resume; temporary files of a crashed write are
    removed. A small ``_run.json`` records the config fingerprint at the start of a run, and what
    it was made of (`made_of`, :func:`configlib.config_record`), which a refusal compares field by
    field to name what changed.
    """
    manifest = read_manifest(uri, endpoint_url)
    run_uri = join(uri, RUN_RECORD)
    try:
        run = read_json(run_uri, endpoint_url)
    except FileNotFoundError:
        run = None
    owner = _record_stage(manifest, run)
    if owner is not None and owner != stage:
        raise StorageError(f"{uri} holds a {owner} output, not a {stage} one; choose another output "
                           "(overwrite never deletes another stage's output)")
    previous = (manifest or {}).get("config_fingerprint") or (run or {}).get("config_fingerprint")
    wrote_nothing = manifest is None and run is not None and previous != config_fp and \
        all(f == run_uri for f in _foreign_files(uri, endpoint_url))
    if wrote_nothing:  # a run stopped by its first checks (a bad input): nothing to keep, so the corrected
        # config starts afresh instead of being refused as another config's output
        log.info("%s: replacing the record of a %s run that wrote nothing (fingerprint %s)", uri, stage, previous)
    if previous is not None and previous != config_fp and not wrote_nothing:
        if not overwrite:
            changed = _changes((run or {}).get("made_of"), made_of)
            raise StorageError(
                f"{uri} already holds {stage} output made with a different config "
                + (f"({changed}; " if changed else "(") + f"fingerprint {previous}, now {config_fp}); "
                "choose another output or set overwrite: true"
            )
        _refuse_dangerous_delete(uri, stage)
        _refuse_nested_outputs(uri, stage, endpoint_url)
        delete_output(uri, endpoint_url)
        manifest = None
    elif previous is None and exists(uri, endpoint_url) and _foreign_files(uri, endpoint_url):
        raise StorageError(
            f"{uri} is not empty and holds no ray-dafusion {stage} run record; choose an empty or new output "
            "(overwrite only ever deletes what a stage wrote)"
        )
    if manifest is not None:
        return manifest
    removed = remove_temp_files(uri, endpoint_url)
    if removed:
        log.info("%s: removed %d temporary files of an interrupted write", uri, removed)
    write_json(run_uri, {"stage": stage, "config_fingerprint": config_fp,
                         **({"made_of": made_of} if made_of is not None else {})}, endpoint_url)
    return None


def _flat_record(record: dict[str, Any]) -> dict[str, str]:
    """A config record (configlib.config_record) as dotted field -> JSON value; inputs as `input x`."""
    out: dict[str, str] = {}

    def walk(name: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{name}.{k}" if name else str(k), v)
        else:  # compared as the fingerprint sees them: JSON, anything else as str
            out[name] = json.dumps(value, sort_keys=True, default=str)

    walk("", record.get("config") or {})
    for k, v in (record.get("inputs") or {}).items():
        walk(f"input {k}", v)
    return out


def _changes(before: Optional[dict[str, Any]], after: Optional[dict[str, Any]], most: int = 6) -> str:
    """The fields two config records differ in, as `field: old -> new`; empty when either record is
    unknown (an output written before records were kept)."""
    if before is None or after is None:
        return ""
    old, new = _flat_record(before), _flat_record(after)
    diffs = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
    return "; ".join(diffs[:most]) + (f"; and {len(diffs) - most} more" if len(diffs) > most else "")


def _short(text: Optional[str]) -> str:
    return "(none)" if text is None else text if len(text) <= 60 else text[:57] + "..."


def delete_output(uri: str, endpoint_url: Optional[str] = None) -> None:
    """Delete a stage's output directory, keeping this process's lease on it: its manifest first (a
    half-deleted output is never complete), its run record last (a delete stopped halfway leaves an
    output that names its stage and config, which overwrite deletes again, not a foreign folder
    every run refuses)."""
    held = _LEASES.get(_lease_key(uri, endpoint_url))
    delete(join(uri, MANIFEST), endpoint_url)
    fs, path = resolve(uri, endpoint_url)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    for entry in sorted(entries, key=lambda e: e.path):
        if posixpath.basename(entry.path) not in (RUN_RECORD, LEASE):
            delete(join(uri, posixpath.basename(entry.path)), endpoint_url)
    delete(uri, endpoint_url)
    if held is not None:
        held.write()


def _is_temp_file(name: str) -> bool:
    """Whether a file name is one `_tmp_name` gives an atomic write in progress (or killed)."""
    return re.match(r"\.tmp-[0-9a-f]{12}-", name) is not None


def _foreign_files(uri: str, endpoint_url: Optional[str]) -> list[str]:
    """Every file under `uri`, hidden and `_` ones included (a user's `.env`, `_notes.md`), except the
    stage's own lease and the temp files of an interrupted write: what makes an output not empty."""
    lease_file = join(uri, LEASE)
    return [f for f in list_files(uri, "", endpoint_url, recursive=True, skip_prefixes=())
            if f != lease_file and not _is_temp_file(posixpath.basename(f))]


def remove_temp_files(uri: str, endpoint_url: Optional[str] = None) -> int:
    """Delete the `.tmp-*` files a killed atomic write left under `uri`; returns how many."""
    fs, path = resolve(uri, endpoint_url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    stale = [i.path for i in infos if i.type == pafs.FileType.File and _is_temp_file(posixpath.basename(i.path))]
    for p in stale:
        try:
            fs.delete_file(p)
        except Exception:  # already gone
            pass
    return len(stale)


# ---- leases: one live driver per output ----------------------------------------------------


class LeaseError(StorageError):
    """Another live driver holds the output."""


def _lease_key(uri: str, endpoint_url: Optional[str]) -> tuple[str, str]:
    return (_endpoint(endpoint_url) or "", uri.rstrip("/"))


_LEASES: dict[tuple[str, str], "_Lease"] = {}
_LEASES_LOCK = threading.Lock()


def _leases_over(uri: str, endpoint_url: Optional[str]) -> list["_Lease"]:
    """The leases this process holds on `uri` or on a folder above it."""
    endpoint, path = _lease_key(uri, endpoint_url)
    with _LEASES_LOCK:
        return [held for (ep, top), held in _LEASES.items()
                if ep == endpoint and (path == top or path.startswith(top + "/"))]


class _Lease:
    """`<output>/_lease.json`: host, pid, start time and a heartbeat refreshed by a thread."""

    def __init__(self, uri: str, stage: str, endpoint_url: Optional[str], ttl: float) -> None:
        self.uri, self.stage, self.endpoint_url, self.ttl = uri, stage, endpoint_url, ttl
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.depth = 0
        self.lost: Optional[str] = None
        self.made_dirs: list[str] = []
        """Local directories the lease itself created, deepest first: removed at release while empty."""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def path(self) -> str:
        return join(self.uri, LEASE)

    def record(self) -> dict[str, Any]:
        return {"stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started_at": self.started, "heartbeat_at": time.time(), "ttl_seconds": self.ttl}

    def write(self) -> None:
        write_json(self.path, self.record(), self.endpoint_url)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.uri}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = read_json(self.path, self.endpoint_url)
            except Exception:
                current = None
            if current is not None and current.get("token") != self.token:
                self.lost = _taken_by(current)
                log.error("%s: lease lost: %s", self.uri, self.lost)
                return
            try:
                self.write()
            except Exception as exc:  # a transient storage error: try again at the next beat
                log.warning("%s: could not refresh the lease: %s", self.uri, exc)

    def confirm(self, attempts: int = 3) -> None:
        """Raise LeaseError when the lease file names another driver, or none. A driver paused past
        the ttl (a stopped process, a suspended machine) or whose clock runs far behind the others'
        looks dead to another driver, which takes the output over; the heartbeat notices only at its
        next beat, so the commit asks first. That narrows the window to the moments between this read
        and the manifest's write; it does not close it (object stores have no compare-and-swap). A
        lease that cannot be read (a storage error, `attempts` times a second apart) does not fail
        the commit of finished work: the heartbeat still watches it."""
        for attempt in range(attempts):
            try:
                current = read_json(self.path, self.endpoint_url)
                break
            except FileNotFoundError:
                current = None
                break
            except Exception as exc:
                if attempt == attempts - 1:
                    log.warning("%s: could not read the lease before marking the output complete (%s); "
                                "marking it complete", self.uri, exc)
                    return
                time.sleep(1.0)
        if current is not None and current.get("token") == self.token:
            return
        self.lost = self.lost or _taken_by(current)
        raise LeaseError(f"{self.uri}: {self.lost} while this driver was writing; it was not marked complete "
                         "by this driver (check the output, or re-run to resume it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = read_json(self.path, self.endpoint_url)
            if current.get("token") == self.token:
                delete(self.path, self.endpoint_url)
        except FileNotFoundError:
            pass
        for made in self.made_dirs:  # a stage refused before writing leaves no empty output behind
            try:
                os.rmdir(made)
            except OSError:  # not empty: the stage wrote there
                break


def _taken_by(current: Optional[dict[str, Any]]) -> str:
    """What became of a lease whose file no longer carries its holder's token."""
    if current is None:
        return "its lease file was removed by another driver"
    return f"{current.get('host')} pid {current.get('pid')} took over the output"


def _holder_alive(holder: dict[str, Any], ttl: float) -> bool:
    """A lease is live while its heartbeat is fresh, unless its pid is provably dead on this host."""
    if time.time() - float(holder.get("heartbeat_at", 0)) > ttl:
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            pass
    return True


@contextlib.contextmanager
def lease(uri: str, stage: str, endpoint_url: Optional[str] = None, ttl: float = 60.0):
    """Hold `uri` for one driver while the block runs; a second driver is refused with the holder's
    host, pid and start time while the holder is alive, and takes over once it is dead (its pid is
    gone on this host, or its heartbeat is older than `ttl` seconds). Re-entrant within a process."""
    key = _lease_key(uri, endpoint_url)
    with _LEASES_LOCK:
        held = _LEASES.get(key)
        if held is not None:
            held.depth += 1
    if held is not None:
        try:
            yield held
        finally:
            held.depth -= 1
        return
    mine = _Lease(uri, stage, endpoint_url, ttl)
    path = mine.path
    holder = _read_lease(path, endpoint_url)
    if holder is not None and _holder_alive(holder, float(holder.get("ttl_seconds", ttl))):
        raise LeaseError(_held_message(uri, holder))
    if holder is not None:
        log.warning("%s: taking over from a dead driver (%s pid %s, last heartbeat %.0fs ago)", uri,
                    holder.get("host"), holder.get("pid"), time.time() - float(holder.get("heartbeat_at", 0)))
        delete(path, endpoint_url)
    fs, local_path = resolve(path, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):  # an exclusive create: exactly one driver succeeds
        missing = os.path.dirname(local_path)
        while not os.path.isdir(missing) and missing != os.path.dirname(missing):
            mine.made_dirs.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        # the record is written whole to a file of its own, then linked into place: the link is the
        # exclusive create, and no lease file is ever seen empty (a crash between create and write
        # left one that read as "being written" forever)
        tmp = _tmp_name(local_path)  # a temp file name the overwrite and emptiness checks know
        try:
            with open(tmp, "x") as f:
                json.dump(mine.record(), f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, local_path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: an exclusive create, then the record
                with open(local_path, "x") as f:
                    json.dump(mine.record(), f)
        except FileExistsError:
            raise LeaseError(_held_message(uri, _read_lease(path, endpoint_url))) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:  # object stores: write, let a concurrent writer land, and see who won (the last write)
        mine.write()
        time.sleep(_LEASE_SETTLE_SECONDS)
        current = read_json(path, endpoint_url)
        if current.get("token") != mine.token:
            raise LeaseError(_held_message(uri, current))
    mine.start()
    with _LEASES_LOCK:
        _LEASES[key] = mine
    try:
        yield mine
    finally:
        with _LEASES_LOCK:
            _LEASES.pop(key, None)
        mine.release()
    if mine.lost:
        raise LeaseError(f"{uri}: {mine.lost} while this driver was writing; check the output before using it")


def _read_lease(path: str, endpoint_url: Optional[str]) -> Optional[dict[str, Any]]:
    """The lease record, None when there is none; a file that is not a record (caught half-written,
    or left empty by an older version's crash) is as old as its last modification."""
    try:
        return read_json(path, endpoint_url)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        info = _info(path, endpoint_url)
        modified = info.mtime.timestamp() if info.mtime is not None else time.time()
        return {"heartbeat_at": modified, "host": "unknown (lease being written)", "pid": "?"}


def leased(stage: str, uri_of: Callable[[Any], str] = lambda cfg: cfg.output):
    """Decorate a stage function so that it holds its output's lease while it runs."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            uri = uri_of(cfg)
            if not uri:  # the stage's own check names the missing field
                return fn(cfg, *args, **kwargs)
            with lease(uri, stage, cfg.endpoint_url):
                return fn(cfg, *args, **kwargs)

        return inner

    return wrap


_LEASE_SETTLE_SECONDS = 1.0  # object stores only; local files use an exclusive create


def _held_message(uri: str, holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
    age = time.time() - float(holder.get("heartbeat_at", 0))
    return (f"{uri} is being written by another {holder.get('stage', 'ray-dafusion')} driver: host "
            f"{holder.get('host')}, pid {holder.get('pid')}, started {started} (heartbeat {age:.0f}s ago). Wait for it "
            f"to finish, or stop it; once it is dead this output can be taken over (after "
            f"{float(holder.get('ttl_seconds', 60)):.0f}s without a heartbeat, at once on the same host).")


def list_dirs(uri: str, endpoint_url: Optional[str] = None) -> list[str]:
    """Sorted names of the folders directly under `uri` (none when it does not exist)."""
    fs, path = resolve(uri, endpoint_url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except Exception as exc:
        raise _wrap(uri, exc) from None
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

