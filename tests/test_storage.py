"""Storage: local, file:// and s3:// (a real loopback S3 server) behave the same."""

import json
import os

import pyarrow as pa
import pytest

from ray_dafusion import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path, s3_bucket):
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return "file://" + str(tmp_path / "out")
    return s3_bucket(f"bucket-{os.getpid()}-{request.node.name.split('[')[0][-20:].replace('_', '-')}".lower()) + "/prefix"


def test_bytes_json_parquet_roundtrip(root):
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"hello")
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"hello"
    storage.write_json(storage.join(root, "x.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(root, "x.json")) == {"k": [1, 2]}
    table = pa.table({"id": ["a", "b"], "v": [1, 2]}).replace_schema_metadata({"huggingface": "{}"})
    storage.write_parquet(table, storage.join(root, "t", "part-0.parquet"))
    back = storage.read_parquet(storage.join(root, "t"))
    assert back.to_pylist() == table.to_pylist()
    assert back.schema.metadata[b"huggingface"] == b"{}"
    assert storage.list_files(storage.join(root, "t"), ".parquet") == [storage.join(root, "t", "part-0.parquet")]
    storage.write_json(storage.join(root, "t", "_run.json"), {})
    storage.write_bytes(storage.join(root, "t", "_cat.png"), b"x")
    assert storage.list_files(storage.join(root, "t")) == [storage.join(root, "t", "part-0.parquet")]  # records out
    assert storage.list_files(storage.join(root, "t"), ".png", skip_prefixes=(".",)) == [storage.join(root, "t", "_cat.png")]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))


def test_a_recursive_listing_skips_hidden_and_underscore_folders(root):
    for rel in ("a/x.parquet", "a/.hid/y.parquet", "a/_sub/z.parquet", ".ipynb_checkpoints/c.parquet", "b/w.parquet"):
        storage.write_bytes(storage.join(root, *rel.split("/")), b"x")
    assert storage.list_files(root, ".parquet", recursive=True) == [
        storage.join(root, "a", "x.parquet"), storage.join(root, "b", "w.parquet")]
    assert storage.parquet_files(storage.join(root, "a")) == [storage.join(root, "a", "x.parquet")]
    assert storage.list_files(root, ".parquet", recursive=True, skip_prefixes=(".",)) == [
        storage.join(root, "a", "_sub", "z.parquet"), storage.join(root, "a", "x.parquet"), storage.join(root, "b", "w.parquet")]
    assert len(storage.list_files(root, ".parquet", recursive=True, skip_prefixes=())) == 5


def test_manifest_marks_completion(root):
    assert storage.read_manifest(root) is None
    storage.write_parquet(pa.table({"x": [1]}), storage.join(root, "part-0.parquet"))
    assert storage.read_manifest(root) is None  # data without a manifest is not complete
    storage.write_manifest(root, {"stage": "t", "counts": {"x": 1}})
    assert storage.read_manifest(root)["counts"] == {"x": 1}


def test_changed_config_refused_unless_overwrite(root):
    assert storage.ensure_fresh_output(root, "t", "fp1", overwrite=False) is None
    storage.write_bytes(storage.join(root, "part-0.parquet"), b"data")
    # same config, unfinished: resume (nothing deleted)
    assert storage.ensure_fresh_output(root, "t", "fp1", overwrite=False) is None
    assert storage.exists(storage.join(root, "part-0.parquet"))
    with pytest.raises(storage.StorageError, match="different config"):
        storage.ensure_fresh_output(root, "t", "fp2", overwrite=False)
    storage.ensure_fresh_output(root, "t", "fp2", overwrite=True)
    assert not storage.exists(storage.join(root, "part-0.parquet"))


def test_a_refusal_names_the_fields_and_inputs_that_changed(root):
    from ray_dafusion.configlib import config_record
    from ray_dafusion.config import AugmentConfig

    before = AugmentConfig(real="runs/a/real", output=root, seed=0, strengths=[0.25, 0.5])
    made_of = config_record(before, model="m1", real={"config_fingerprint": "r1", "classes": ["cat"]})
    storage.ensure_fresh_output(root, "augment", storage.fingerprint(made_of), False, made_of=made_of)
    storage.write_bytes(storage.join(root, "data", "part-0.parquet"), b"data")  # a run that wrote some output
    after = before.replace(real="runs/b/real", strengths=[0.25, 0.75], batch_size=99)  # batch_size: a resource
    changed = config_record(after, model="m1", real={"config_fingerprint": "r2", "classes": ["cat"]})
    with pytest.raises(storage.StorageError) as refused:
        storage.ensure_fresh_output(root, "augment", storage.fingerprint(changed), False, made_of=changed)
    assert ('different config (input real.config_fingerprint: "r1" -> "r2"; real: "runs/a/real" -> "runs/b/real"; '
            'strengths: [0.25, 0.5] -> [0.25, 0.75]; fingerprint ') in str(refused.value)
    assert "batch_size" not in str(refused.value) and "model" not in str(refused.value)
    # an output recorded without what it was made of (before records were kept): the fingerprints only
    storage.write_json(storage.join(root, storage.RUN_RECORD), {"stage": "augment", "config_fingerprint": "old"})
    with pytest.raises(storage.StorageError, match=r"different config \(fingerprint old, now "):
        storage.ensure_fresh_output(root, "augment", storage.fingerprint(changed), False, made_of=changed)


def test_a_run_that_wrote_nothing_does_not_hold_its_output_to_its_config(root):
    """A first run stopped by its own checks (e.g. 'set allow_fewer: true') left only its record:
    the corrected config starts afresh instead of being refused as another config's output."""
    assert storage.ensure_fresh_output(root, "ingest", "fp1", overwrite=False) is None
    assert storage.ensure_fresh_output(root, "ingest", "fp2", overwrite=False) is None
    assert storage.read_json(storage.join(root, storage.RUN_RECORD))["config_fingerprint"] == "fp2"
    storage.write_bytes(storage.join(root, "train", "part-0.parquet"), b"data")  # now it wrote something
    with pytest.raises(storage.StorageError, match="different config"):
        storage.ensure_fresh_output(root, "ingest", "fp3", overwrite=False)


def test_absolute_keeps_a_file_uri_and_makes_its_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("file://data/real") == f"file://{tmp_path}/data/real"  # as resolve() reads it
    assert storage.resolve(storage.absolute("file://data/real"))[1] == storage.resolve("file://data/real")[1]
    assert storage.absolute("data/real") == f"{tmp_path}/data/real"
    assert storage.absolute("s3://b/x") == "s3://b/x"


def test_bad_uris_are_named():
    with pytest.raises(storage.StorageError, match="unsupported URI scheme 'gs://'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.resolve("s3://")
    with pytest.raises(storage.StorageError, match="empty"):
        storage.resolve("")
    # S3 keeps these segments literally, the HTTP layer collapses them: s3://bkt/a/.. is the bucket
    for uri in ("s3://bkt/a/..", "s3://bkt/a/../b", "s3://bkt/./a", "s3://bkt//a", "s3://bkt/a//b/", "s3://../a"):
        with pytest.raises(storage.StorageError, match="empty, '.' or '..' path segment") as refused:
            storage.resolve(uri)
        assert repr(uri) in str(refused.value)
        with pytest.raises(storage.StorageError, match="path segment"):
            storage.delete(uri)
    assert storage.resolve("s3://bkt/a/b/")[1] == "bkt/a/b"  # a trailing / is stripped


def test_a_missing_bucket_is_named_without_the_secret(s3_server):
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes("s3://no-such-bucket-here/x", b"1", endpoint_url=s3_server)
    assert "no-such-bucket-here" in str(err.value)
    assert "testing-secret-value" not in str(err.value)


def test_refused_credentials_are_named():
    """An S3 endpoint on loopback that answers every request as S3 does for an unknown access key."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS '
                    b'Access Key Id you provided does not exist in our records.</Message></Error>')
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for call in (lambda: storage.write_bytes("s3://bucket/x", b"1", endpoint_url=endpoint),
                     lambda: storage.read_bytes("s3://bucket/x", endpoint_url=endpoint),
                     lambda: storage.exists("s3://bucket/x", endpoint_url=endpoint),
                     lambda: storage.list_dirs("s3://bucket/x", endpoint_url=endpoint),
                     lambda: storage.list_files("s3://bucket/x", endpoint_url=endpoint)):
            with pytest.raises(storage.StorageError, match="S3 refused access to s3://bucket/x: check the AWS credentials"):
                call()
    finally:
        server.shutdown()


def test_atomic_local_write_leaves_no_temp(tmp_path):
    target = str(tmp_path / "f.bin")
    storage.write_bytes(target, b"1")
    storage.write_bytes(target, b"2")
    assert open(target, "rb").read() == b"2"
    assert os.listdir(tmp_path) == ["f.bin"]


# ---- overwrite deletes only what a stage wrote ----------------------------------------------------


def test_overwrite_never_deletes_what_a_stage_did_not_write(tmp_path, monkeypatch):
    unrelated = tmp_path / "my-photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(storage.StorageError, match="holds no ray-dafusion augment run record"):
            storage.ensure_fresh_output(str(unrelated), "augment", "fp", overwrite)
    assert (unrelated / "holiday.jpg").read_bytes() == b"precious"
    # another stage's output is never deleted by this one's overwrite
    real = str(tmp_path / "real")
    storage.ensure_fresh_output(real, "ingest", "fp1", False)
    storage.write_manifest(real, {"stage": "ingest", "config_fingerprint": "fp1"})
    with pytest.raises(storage.StorageError, match="holds a ingest output, not a augment one"):
        storage.ensure_fresh_output(real, "augment", "fp2", True)
    assert storage.read_manifest(real)["stage"] == "ingest"
    # an output that is the current directory (`--output .`) or above it is never deleted
    monkeypatch.chdir(real)
    with pytest.raises(storage.StorageError, match="current directory"):
        storage.ensure_fresh_output(".", "ingest", "fp2", True)
    storage.write_json(str(tmp_path / "_run.json"), {"stage": "ingest", "config_fingerprint": "fp0"})
    with pytest.raises(storage.StorageError, match="current directory, one above it"):
        storage.ensure_fresh_output(str(tmp_path), "ingest", "fp2", True)  # the parent of the working directory
    assert storage.read_manifest(real)["stage"] == "ingest"
    with pytest.raises(storage.StorageError, match="whole bucket"):
        storage._refuse_dangerous_delete("s3://bucket", "ingest")
    # the stage's own output of another config is deleted with overwrite: true
    monkeypatch.chdir(tmp_path)
    assert storage.ensure_fresh_output(real, "ingest", "fp2", True) is None
    assert storage.read_manifest(real) is None and storage.read_json(storage.join(real, "_run.json"))[
        "config_fingerprint"] == "fp2"


def test_hidden_and_underscore_files_make_an_output_not_empty(root):
    storage.write_bytes(storage.join(root, ".env"), b"SECRET=1")
    storage.write_bytes(storage.join(root, "notes", "_notes.md"), b"mine")
    for overwrite in (False, True):
        with pytest.raises(storage.StorageError, match="is not empty and holds no ray-dafusion ingest run record"):
            storage.ensure_fresh_output(root, "ingest", "fp", overwrite)
    assert storage.read_bytes(storage.join(root, ".env")) == b"SECRET=1"
    assert not storage.exists(storage.join(root, storage.RUN_RECORD))
    # the stage's own lease and the temp files of an interrupted write do not count
    fresh = storage.join(root, "fresh")
    storage.write_json(storage.join(fresh, storage.LEASE), {"stage": "ingest"})
    storage.write_bytes(storage.join(fresh, "train", ".tmp-0123456789ab-part-0.parquet"), b"half")
    assert storage.ensure_fresh_output(fresh, "ingest", "fp", False) is None
    assert storage.read_json(storage.join(fresh, storage.RUN_RECORD))["stage"] == "ingest"


def test_overwrite_never_deletes_another_stages_output_nested_inside(root):
    real, tokens = storage.join(root, "real"), storage.join(root, "real", "tokens")
    storage.ensure_fresh_output(real, "ingest", "fp1", False)
    storage.write_manifest(real, {"stage": "ingest", "config_fingerprint": "fp1"})
    storage.ensure_fresh_output(tokens, "invert", "fpi", False)
    storage.write_manifest(tokens, {"stage": "invert", "config_fingerprint": "fpi"})
    with pytest.raises(storage.StorageError, match=r"holds a invert output at .*real/tokens"):
        storage.ensure_fresh_output(real, "ingest", "fp2", True)
    assert storage.read_manifest(tokens)["stage"] == "invert"
    assert storage.read_manifest(real)["stage"] == "ingest"
    # a nested run not yet complete (only its _run.json) is another stage's output too
    storage.delete(storage.join(tokens, storage.MANIFEST))
    with pytest.raises(storage.StorageError, match=r"holds a invert output at .*real/tokens"):
        storage.ensure_fresh_output(real, "ingest", "fp2", True)
    assert storage.exists(storage.join(tokens, storage.RUN_RECORD))
    # an augment output's score tables are part of it and go with it
    synthetic = storage.join(root, "synthetic")
    storage.ensure_fresh_output(synthetic, "augment", "fpa", False)
    storage.write_manifest(synthetic, {"stage": "augment", "config_fingerprint": "fpa"})
    scores = storage.join(synthetic, "scores", "clip")
    storage.ensure_fresh_output(scores, "score", "fps", False)
    storage.write_manifest(scores, {"stage": "score", "config_fingerprint": "fps"})
    # ... unless a live driver is writing them: a score run beside an augment re-run with overwrite
    import time

    lease = {"stage": "score", "host": "gpu-node-7", "pid": 4242, "token": "x", "started_at": time.time() - 100,
             "ttl_seconds": 60}
    storage.write_json(storage.join(scores, "_lease.json"), {**lease, "heartbeat_at": time.time() - 5})
    with pytest.raises(storage.LeaseError, match=r"overwrite: .*scores/clip is being written by another score driver: "
                                                 r"host gpu-node-7, pid 4242"):
        storage.ensure_fresh_output(synthetic, "augment", "fpb", True)
    assert storage.read_manifest(scores)["stage"] == "score" and storage.read_manifest(synthetic)["stage"] == "augment"
    storage.write_json(storage.join(scores, "_lease.json"), {**lease, "heartbeat_at": time.time() - 61})  # dead
    assert storage.ensure_fresh_output(synthetic, "augment", "fpb", True) is None
    assert storage.read_manifest(scores) is None and storage.read_manifest(synthetic) is None


def test_temp_files_of_a_crashed_write_are_removed_on_the_next_run(root):
    storage.ensure_fresh_output(root, "augment", "fp", False)
    storage.write_bytes(storage.join(root, "data", ".tmp-0123456789ab-part-x.parquet"), b"half a file")
    storage.write_bytes(storage.join(root, "data", "part-y.parquet"), b"a committed file")
    assert storage.ensure_fresh_output(root, "augment", "fp", False) is None  # same config: resume
    fs, path = storage.resolve(storage.join(root, "data"))
    import pyarrow.fs as pafs

    names = sorted(os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path)))
    assert names == ["part-y.parquet"]


# ---- one live driver per output -------------------------------------------------------------------

_HOLDER = """
import sys, time
from ray_dafusion import storage
with storage.lease(sys.argv[1], "augment", ttl=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(uri: str, ttl: float = 60.0):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, uri, str(ttl)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_driver_is_refused_while_the_first_lives_then_takes_over(where, tmp_path, s3_bucket):
    import signal
    import socket

    uri = str(tmp_path / "out") if where == "local" else s3_bucket("lease-" + where) + "/out"
    holder = _hold(uri)
    try:
        with pytest.raises(storage.LeaseError) as err:
            with storage.lease(uri, "augment"):
                pass
        message = str(err.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "started" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder is dead (its pid is gone on this host): the next driver takes over at once
    with storage.lease(uri, "augment") as mine:
        assert storage.read_json(storage.join(uri, "_lease.json"))["token"] == mine.token
    with pytest.raises(FileNotFoundError):  # released at the end
        storage.read_json(storage.join(uri, "_lease.json"))


def test_a_lease_removes_the_empty_directories_it_made(tmp_path):
    """A stage refused before writing leaves no empty output behind, however deep; a directory
    that was there, or that the stage wrote in, stays."""
    (tmp_path / "there").mkdir()
    with storage.lease(str(tmp_path / "there" / "a" / "b" / "c"), "augment"):
        assert (tmp_path / "there" / "a" / "b" / "c" / "_lease.json").exists()
    assert os.listdir(tmp_path / "there") == []
    with storage.lease(str(tmp_path / "there" / "a" / "b"), "augment"):
        storage.write_bytes(str(tmp_path / "there" / "a" / "b" / "x.bin"), b"x")
    assert os.listdir(tmp_path / "there" / "a" / "b") == ["x.bin"]


def test_a_lease_from_another_host_lives_by_its_heartbeat(tmp_path):
    import time

    uri = str(tmp_path / "out")
    record = {"stage": "train", "host": "gpu-node-7", "pid": 4242, "token": "x", "started_at": time.time() - 100,
              "ttl_seconds": 30}
    storage.write_json(storage.join(uri, "_lease.json"), {**record, "heartbeat_at": time.time() - 5})
    with pytest.raises(storage.LeaseError, match="gpu-node-7, pid 4242"):
        with storage.lease(uri, "train"):
            pass
    storage.write_json(storage.join(uri, "_lease.json"), {**record, "heartbeat_at": time.time() - 31})
    with storage.lease(uri, "train"):  # stale: taken over
        pass


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_driver_whose_lease_passed_to_another_does_not_mark_the_output_complete(where, tmp_path, s3_bucket):
    """A driver paused past its lease's ttl (or with a clock far behind) looks dead and is taken
    over; when it resumes, its commit asks the lease file and refuses before its heartbeat would
    notice, and leaves the other driver's lease in place."""
    import time

    uri = str(tmp_path / "out") if where == "local" else s3_bucket("fence-" + where) + "/out"
    with pytest.raises(storage.LeaseError, match="gpu-node-7 pid 4242 took over the output") as err:
        with storage.lease(uri, "augment", ttl=3600):  # no heartbeat within the test
            storage.write_manifest(storage.join(uri, "part"), {"stage": "augment"})  # still ours: written
            storage.write_json(storage.join(uri, "_lease.json"), {"stage": "augment", "host": "gpu-node-7", "pid": 4242,
                                                                  "token": "theirs", "heartbeat_at": time.time()})
            storage.write_manifest(storage.join(uri, "deeper"), {"stage": "augment"})  # below the lease: asked too
    assert "not marked complete" in str(err.value)
    assert storage.read_manifest(storage.join(uri, "deeper")) is None
    assert storage.read_manifest(storage.join(uri, "part"))["stage"] == "augment"
    assert storage.read_json(storage.join(uri, "_lease.json"))["token"] == "theirs"
    with storage.lease(str(tmp_path / "a"), "augment", ttl=3600):  # a lease on a says nothing of a2
        storage.delete(storage.join(str(tmp_path / "a"), "_lease.json"))
        storage.write_manifest(str(tmp_path / "a2"), {"stage": "augment"})
    assert storage.read_manifest(str(tmp_path / "a2"))["stage"] == "augment"
    with pytest.raises(storage.LeaseError, match="lease file was removed"):
        with storage.lease(str(tmp_path / "other"), "augment", ttl=3600):
            storage.delete(storage.join(str(tmp_path / "other"), "_lease.json"))
            storage.write_manifest(str(tmp_path / "other"), {"stage": "augment"})
    assert storage.read_manifest(str(tmp_path / "other")) is None


def test_a_lease_that_cannot_be_read_does_not_fail_the_commit(tmp_path, monkeypatch, caplog):
    # a storage error reading the lease (a 503, throttling) must not fail hours of finished work
    import time

    uri = str(tmp_path / "out")
    real_read = storage.read_json
    monkeypatch.setattr(time, "sleep", lambda s: None)
    def throttled(u, *args, **kwargs):
        if u.endswith("_lease.json"):
            raise OSError("503 Slow Down")
        return real_read(u, *args, **kwargs)

    with storage.lease(uri, "augment", ttl=3600):
        monkeypatch.setattr(storage, "read_json", throttled)
        storage.write_manifest(uri, {"stage": "augment"})
        monkeypatch.setattr(storage, "read_json", real_read)
    assert storage.read_manifest(uri)["stage"] == "augment" and "503 Slow Down" in caplog.text


def test_a_lease_file_left_empty_ages_by_its_modification_time(tmp_path):
    """A crash between creating a lease file and writing it (an older version wrote in two steps)
    left an empty file that read as "being written" forever; it is as old as its last write."""
    import time

    uri = str(tmp_path / "out")
    os.makedirs(uri)
    empty = os.path.join(uri, "_lease.json")
    open(empty, "w").close()
    with pytest.raises(storage.LeaseError, match="being written"):  # fresh: maybe a driver writing it now
        with storage.lease(uri, "train"):
            pass
    os.utime(empty, (time.time() - 3600, time.time() - 3600))
    with storage.lease(uri, "train"):  # an hour old: taken over
        assert json.load(open(empty))["stage"] == "train"  # written whole, in one step
    assert os.listdir(uri) == []


def test_a_stage_refuses_an_output_another_driver_holds(ray_session, make_real, tmp_path):
    from ray_dafusion import IngestConfig
    from ray_dafusion.ingest import ingest
    from ray_dafusion.sample_data import write_digits

    source = str(tmp_path / "digits")
    write_digits(source, size=8, per_class=4)
    out = str(tmp_path / "real")
    holder = _hold(out)
    try:
        with pytest.raises(storage.LeaseError, match=f"pid {holder.pid}"):
            ingest(IngestConfig(source=source, output=out, examples_per_class=1, classes=["one", "two"]))
    finally:
        holder.kill()
        holder.wait()
    assert ingest(IngestConfig(source=source, output=out, examples_per_class=1, classes=["one", "two"])).counts


def test_ray_dataset_reads_the_files_without_a_footer_reader_pool(root, ray_session):
    """Rows and columns as written, from local files and S3 alike, through the parquet datasource that
    starts no per-read actor pool; the process's Ray Data default is left as it was."""
    import ray.data

    files = []
    for i in range(2):
        files.append(storage.join(root, "d", f"part-{i}.parquet"))
        storage.write_parquet(pa.table({"id": [f"{i}a", f"{i}b"], "v": [i, i + 10], "x": [0, 0]}), files[-1])
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2, context.enable_progress_bars
    ds = storage.ray_dataset(files, ["id", "v"])
    assert (context.use_datasource_v2, context.enable_progress_bars) == before
    assert ds.context.enable_progress_bars == before[1]
    assert ds._logical_plan.dag.name == "ReadParquet"  # Ray Data's default here: ReadFilesParquetV2
    assert sorted(ds.take_all(), key=lambda r: r["id"]) == [
        {"id": "0a", "v": 0}, {"id": "0b", "v": 10}, {"id": "1a", "v": 1}, {"id": "1b", "v": 11}]


def test_an_overwrite_stopped_halfway_leaves_an_output_overwrite_can_delete(root, monkeypatch):
    """The manifest goes first (never complete when half-deleted), the run record last: a delete
    stopped after the first folder leaves the record, so the next overwrite deletes the rest."""
    assert storage.ensure_fresh_output(root, "t", "fp1", overwrite=False) is None
    for rel in ("a/part-0.parquet", "b/part-0.parquet"):
        storage.write_bytes(storage.join(root, *rel.split("/")), b"data")
    storage.write_manifest(root, {"stage": "t", "config_fingerprint": "fp1"})
    real_delete, deleted = storage.delete, []

    def stops_after_two(uri, endpoint_url=None):
        if len(deleted) == 2:
            raise KeyboardInterrupt
        deleted.append(uri)
        real_delete(uri, endpoint_url)

    monkeypatch.setattr(storage, "delete", stops_after_two)
    with pytest.raises(KeyboardInterrupt):
        storage.ensure_fresh_output(root, "t", "fp2", overwrite=True)
    monkeypatch.setattr(storage, "delete", real_delete)
    assert deleted == [storage.join(root, "manifest.json"), storage.join(root, "a")]
    assert storage.read_manifest(root) is None and storage.exists(storage.join(root, "b", "part-0.parquet"))
    storage.ensure_fresh_output(root, "t", "fp2", overwrite=True)  # the record names it: deleted again
    assert not storage.exists(storage.join(root, "b", "part-0.parquet"))
