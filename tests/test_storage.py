"""Storage: local, file:// and s3:// (a real loopback S3 server) behave the same."""

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
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))


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


def test_bad_uris_are_named():
    with pytest.raises(storage.StorageError, match="unsupported URI scheme 'gs://'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.resolve("s3://")
    with pytest.raises(storage.StorageError, match="empty"):
        storage.resolve("")


def test_missing_bucket_and_bad_credentials(s3_server, monkeypatch):
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes("s3://no-such-bucket-here/x", b"1", endpoint_url=s3_server)
    assert "no-such-bucket-here" in str(err.value)
    assert "testing-secret-value" not in str(err.value)


def test_atomic_local_write_leaves_no_temp(tmp_path):
    target = str(tmp_path / "f.bin")
    storage.write_bytes(target, b"1")
    storage.write_bytes(target, b"2")
    assert open(target, "rb").read() == b"2"
    assert os.listdir(tmp_path) == ["f.bin"]
