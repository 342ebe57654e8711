"""Ingest: image folders, VOC and COCO into split parquet shards; bad input never lost."""

import io
import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_dafusion import IngestConfig, schema, storage
from ray_dafusion.errors import ConfigError
from ray_dafusion.ingest import ingest, load_image_file

pytestmark = pytest.mark.usefixtures("ray_session")


def _png(seed: int, size=(20, 16), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _save(img: Image.Image, path, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)


def _read_split(out, split):
    files = storage.list_files(storage.join(out, split), ".parquet")
    return storage.read_parquet(storage.join(out, split)).to_pylist() if files else []


def _folder(tmp_path, classes=("cat", "dog"), n=6):
    root = tmp_path / "src"
    seed = 0
    for cls in classes:
        for i in range(n):
            seed += 1
            _save(_png(seed), str(root / cls / f"img{i}.png"))
    return root


def _given(tmp_path, sizes, seed, classes=("cat", "dog")):
    """A source with its own splits: root/<split>/<class>/<i>.png, `sizes` images per class and split,
    every image distinct (pixels from `seed` on)."""
    root = tmp_path / "given"
    for split, n in sizes.items():
        for cls in classes:
            for i in range(n):
                seed += 1
                _save(_png(seed), str(root / split / cls / f"{i}.png"))
    return root


def test_folder_splits_are_seeded_disjoint_and_nested(tmp_path):
    root = _folder(tmp_path, n=10)
    small = ingest(IngestConfig(source=str(root), output=str(tmp_path / "k2"), examples_per_class=2, seed=3))
    big = ingest(IngestConfig(source=str(root), output=str(tmp_path / "k4"), examples_per_class=4, seed=3))
    assert small.classes == ["cat", "dog"]
    # val and test: a quarter of each class each, the same whatever the shots
    assert small.counts == {"train": 4, "val": 4, "test": 4}
    assert big.counts == {"train": 8, "val": 4, "test": 4}
    assert small.skipped == {"unused": 8} and big.skipped == {"unused": 4}  # the pool beyond k
    splits = {s: _read_split(big.output, s) for s in ("train", "val", "test")}
    ids = {s: {r["id"] for r in rows} for s, rows in splits.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    small_train = {r["source_path"] for r in _read_split(small.output, "train")}
    big_train = {r["source_path"] for r in splits["train"]}
    assert small_train < big_train  # smaller few-shot subsets are prefixes of larger ones
    # a different seed picks a different subset, never from val or test, which stay the same
    other = ingest(IngestConfig(source=str(root), output=str(tmp_path / "s9"), examples_per_class=4, seed=9))
    assert {r["source_path"] for r in _read_split(other.output, "train")} != big_train
    prints = [storage.read_manifest(r.output)["split_fingerprints"] for r in (small, big, other)]
    assert len({(p["val"], p["test"]) for p in prints}) == 1 and len({p["train"] for p in prints}) == 3
    for split in ("val", "test"):
        assert {r["id"] for r in _read_split(other.output, split)} == ids[split]
    manifest = storage.read_manifest(big.output)
    assert manifest["classes"] == [{"name": "cat", "label": 0, "token": "<cat>"},
                                   {"name": "dog", "label": 1, "token": "<dog>"}]
    assert manifest["counts"]["per_class"]["train"] == {"cat": 4, "dog": 4}
    assert manifest["seed"] == 3


def test_explicit_val_and_test_sizes_and_shard_bound(tmp_path):
    root = _folder(tmp_path, n=9)
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=2,
                              val_per_class=3, test_per_class=1, rows_per_file=2))
    assert res.counts == {"train": 4, "val": 6, "test": 2}
    assert res.skipped == {"unused": 6}  # 2 classes x (9 - 2 - 3 - 1): counted, not dropped silently
    assert storage.read_manifest(res.output)["counts"]["skipped"] == {"unused": 6}
    for f in storage.list_files(storage.join(res.output, "val"), ".parquet"):
        assert pq.read_metadata(f).num_rows <= 2


def test_rerun_skips_and_changed_config_is_refused(tmp_path):
    root = _folder(tmp_path)
    out = str(tmp_path / "o")
    ingest(IngestConfig(source=str(root), output=out, examples_per_class=2))
    assert ingest(IngestConfig(source=str(root), output=out, examples_per_class=2)).reused
    with pytest.raises(storage.StorageError, match="different config"):
        ingest(IngestConfig(source=str(root), output=out, examples_per_class=3))
    res = ingest(IngestConfig(source=str(root), output=out, examples_per_class=3, overwrite=True))
    assert res.counts["train"] == 6 and not res.reused


def test_bad_files_are_converted_or_quarantined_and_counted(tmp_path):
    root = tmp_path / "src"
    cls = root / "café au lait"  # unicode and spaces in a class name
    for i in range(3):
        _save(_png(100 + i), str(cls / f"ok{i}.PNG"))  # extension case does not matter
    _save(_png(1), str(cls / "upper.JPG"), fmt="JPEG")
    _save(_png(2, mode="L"), str(cls / "gray.png"))
    _save(_png(3, mode="P"), str(cls / "palette.gif"), fmt="GIF")
    rgba = _png(4).convert("RGBA")
    rgba.putalpha(0)
    _save(rgba, str(cls / "transparent.png"))
    _save(_png(5).convert("CMYK"), str(cls / "cmyk.jpeg"), fmt="JPEG")
    deep = Image.fromarray(np.arange(20 * 16, dtype=np.uint16).reshape(16, 20) * 200)
    assert deep.mode == "I;16"
    _save(deep, str(cls / "deep.png"))
    good = io.BytesIO()
    _png(6).save(good, format="PNG")
    (cls / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "notes.txt").write_text("not an image")
    (cls / "copy.png").write_bytes((cls / "ok0.PNG").read_bytes())  # duplicate by content
    (root / "stray.png").write_bytes((cls / "ok1.PNG").read_bytes())  # outside any class folder
    (root / "empty class").mkdir()
    other = root / "日本"
    for i in range(4):
        _save(_png(200 + i), str(other / f"{i}.webp"), fmt="WEBP")

    # every usable image into a split: the train pools (what val and test leave) become train
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=5, allow_fewer=True))
    assert res.classes == ["café au lait", "日本"] and "unused" not in res.skipped
    rows = [r for s in ("train", "val", "test") for r in _read_split(res.output, s)]
    kept = sorted(os.path.basename(r["source_path"]) for r in rows if r["class_name"] == "café au lait")
    # of two identical files the first by path is kept, the other quarantined as its duplicate
    assert kept == sorted(["copy.png", "ok1.PNG", "ok2.PNG", "upper.JPG", "gray.png", "palette.gif",
                           "transparent.png", "cmyk.jpeg", "deep.png"])
    for r in rows:  # every stored image decodes to RGB of the recorded size
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert img.convert("RGB").size == (r["width"], r["height"]) == (20, 16)
        assert img.mode == "RGB"
    errors = {os.path.basename(e["item"]): e["reason"] for e in storage.read_parquet(storage.join(res.output, "errors")).to_pylist()}
    assert "truncated" in errors["truncated.png"]
    assert errors["empty.jpg"] == "zero-byte file"
    assert "not a readable image" in errors["notes.txt"]
    assert errors["ok0.PNG"] == "duplicate of café au lait/copy.png (same pixels)"
    assert "not inside a class folder" in errors["stray.png"]
    manifest = storage.read_manifest(res.output)
    assert manifest["counts"]["errors"] == len(errors) == 5
    assert manifest["counts"]["empty_classes"] == ["empty class"]
    assert manifest["counts"]["listed"] == 9 + 5 + 4
    assert sum(manifest["counts"]["splits"].values()) + len(errors) == manifest["counts"]["listed"]
    # transparent pixels are composited over white, not black
    row = next(r for r in rows if r["source_path"].endswith("transparent.png"))
    assert np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))).min() == 255


def test_too_few_images_is_refused_unless_allowed(tmp_path):
    root = _folder(tmp_path, classes=("cat",), n=6)
    for i in range(2):
        _save(_png(50 + i), str(root / "rare bird" / f"{i}.png"))
    with pytest.raises(ValueError, match=r"'rare bird' \(2\).*allow_fewer"):
        ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=4))
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o2"), examples_per_class=4, allow_fewer=True))
    assert storage.read_manifest(res.output)["counts"]["per_class"]["train"] == {"cat": 4, "rare bird": 2}


def test_same_image_under_two_classes_is_quarantined(tmp_path):
    root = _folder(tmp_path, n=6)
    (root / "dog" / "also_cat.png").write_bytes((root / "cat" / "img0.png").read_bytes())
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=2))
    errors = {e["item"]: e["reason"] for e in storage.read_parquet(storage.join(res.output, "errors")).to_pylist()}
    assert errors == {"cat/img0.png": "same image appears under several classes: cat, dog",
                      "dog/also_cat.png": "duplicate of cat/img0.png (same pixels)"}
    assert res.counts["train"] + res.counts["val"] + res.counts["test"] + res.skipped["unused"] == 11


def test_two_classes_with_one_token_are_refused_before_any_image_is_read(tmp_path):
    root = _folder(tmp_path, classes=("leafy spurge", "leafy_spurge", "cat"), n=4)
    (root / "leafy_spurge" / "img0.png").write_bytes(b"")  # would be quarantined, if images were read
    with pytest.raises(ValueError, match=r"classes 'leafy spurge' and 'leafy_spurge' in .* would share the token "
                                         r"<leafy_spurge>: .*Rename one of them"):
        ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=1))
    assert not (tmp_path / "o" / "errors").exists() and not (tmp_path / "o" / "train").exists()
    (root / "leafy_spurge").rename(root / "Leafy Spurge")
    with pytest.raises(ValueError, match=r"'Leafy Spurge' and 'leafy spurge' .* one token \(<Leafy_Spurge> and "
                                         r"<leafy_spurge> differ only in case"):
        ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=1))
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o2"), examples_per_class=1,
                              classes=["cat", "leafy spurge"]))
    assert res.classes == ["cat", "leafy spurge"]


def _voc_xml(filename, objects):
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for n, (a, b, c, d) in objects
    )
    return f"<annotation><filename>{filename}</filename>{objs}</annotation>"


def test_voc_largest_object_labels_the_image(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for i in range(4):
        stem = "_3" if i == 3 else str(i)  # a name starting with "_" is an image like any other
        _save(_png(i), str(root / "JPEGImages" / f"{stem}.jpg"), fmt="JPEG")
        # a small cat and a large dog for images 0-1; a large cat and a small dog for 2-3
        big, small = ("dog", "cat") if i < 2 else ("cat", "dog")
        (root / "Annotations" / f"{stem}.xml").write_text(
            _voc_xml(f"{stem}.jpg", [(small, (0, 0, 4, 4)), (big, (0, 0, 10, 12))]))
    nameless = "<object><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>30</xmax><ymax>30</ymax></bndbox></object>"
    xml0 = root / "Annotations" / "0.xml"  # a larger object without a name cannot label it: counted, not used
    xml0.write_text(xml0.read_text().replace("</annotation>", nameless + "</annotation>"))
    _save(_png(9), str(root / "JPEGImages" / "9.jpg"), fmt="JPEG")
    (root / "Annotations" / "9.xml").write_text(_voc_xml("9.jpg", []))  # no objects: skipped
    (root / "Annotations" / "bad.xml").write_text("<annotation><object>")  # unreadable
    res = ingest(IngestConfig(source=str(root), format="voc", output=str(tmp_path / "o"), examples_per_class=1,
                              val_per_class=1, test_per_class=0))
    rows = [r for s in ("train", "val", "test") for r in _read_split(res.output, s)]
    labels = {os.path.basename(r["source_path"]): r["class_name"] for r in rows}
    assert labels == {"0.jpg": "dog", "1.jpg": "dog", "2.jpg": "cat", "_3.jpg": "cat"}
    assert res.skipped == {"no_objects": 1, "objects_without_name_or_box": 1}
    errors = storage.read_parquet(storage.join(res.output, "errors")).to_pylist()
    assert [e["item"] for e in errors] == ["Annotations/bad.xml"]
    assert "unreadable annotation" in errors[0]["reason"]


def test_coco_largest_area_labels_the_image(tmp_path):
    images = tmp_path / "coco" / "images"
    anns, imgs = [], []
    for i in range(4):
        _save(_png(i), str(images / f"{i}.png"))
        imgs.append({"id": i, "file_name": f"{i}.png"})
        anns.append({"id": 10 * i, "image_id": i, "category_id": 1, "area": 50.0 if i % 2 else 5.0})
        anns.append({"id": 10 * i + 1, "image_id": i, "category_id": 2, "area": 20.0})
    imgs.append({"id": 99, "file_name": "unlabelled.png"})
    imgs.append({"id": 5})  # annotated, but no file to read: quarantined
    anns.append({"id": 50, "image_id": 5, "category_id": 1, "area": 9.0})
    anns.append({"id": 77, "image_id": 77, "category_id": 1, "area": 9.0})  # of an image not listed: quarantined
    ann_file = tmp_path / "coco" / "instances.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns,
                                    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "traffic light"}]}))
    res = ingest(IngestConfig(source=str(ann_file), format="coco", images_dir=str(images),
                              output=str(tmp_path / "o"), examples_per_class=1, val_per_class=1, test_per_class=0))
    rows = [r for s in ("train", "val", "test") for r in _read_split(res.output, s)]
    assert {r["source_path"]: r["class_name"] for r in rows} == {
        "0.png": "traffic light", "1.png": "person", "2.png": "traffic light", "3.png": "person"}
    assert res.skipped == {"no_objects": 1}
    assert storage.read_manifest(res.output)["classes"][1]["token"] == "<traffic_light>"
    errors = storage.read_parquet(storage.join(res.output, "errors")).to_pylist()
    assert sorted((e["item"], e["reason"]) for e in errors) == [
        ("annotation 77", "annotation of image_id 77, which the 'images' list does not hold"),
        ("image 5", "image entry without a file_name (got None)")]


def test_coco_categories_sharing_a_name_are_one_class_and_said_so(caplog):
    from ray_dafusion.ingest import _coco_items

    data = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(2)],
            "annotations": [{"id": i, "image_id": i, "category_id": i + 1, "area": 5.0} for i in range(2)],
            "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "dog"}]}
    items, _ = _coco_items(data, "/imgs", None, "", [])
    assert [i["class_name"] for i in items] == ["dog", "dog"]
    assert "categories 1, 2 share the name 'dog': their images are one class" in caplog.text


def test_an_image_annotated_twice_is_used_once_and_the_later_annotation_quarantined(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for i in range(4):
        _save(_png(i), str(root / "JPEGImages" / f"{i}.jpg"), fmt="JPEG")
        (root / "Annotations" / f"{i}.xml").write_text(_voc_xml(f"{i}.jpg", [("cat" if i < 2 else "dog", (0, 0, 5, 5))]))
    (root / "Annotations" / "z.xml").write_text(_voc_xml("0.jpg", [("dog", (0, 0, 5, 5))]))  # 0.jpg again
    res = ingest(IngestConfig(source=str(root), format="voc", output=str(tmp_path / "v"), examples_per_class=1,
                              val_per_class=0, test_per_class=1))
    rows = [r for s in ("train", "val", "test") for r in _read_split(res.output, s)]
    assert sorted((r["source_path"], r["class_name"]) for r in rows) == [
        ("JPEGImages/0.jpg", "cat"), ("JPEGImages/1.jpg", "cat"), ("JPEGImages/2.jpg", "dog"),
        ("JPEGImages/3.jpg", "dog")]
    errors = storage.read_parquet(storage.join(res.output, "errors")).to_pylist()
    assert [(e["item"], e["class_name"], e["reason"]) for e in errors] == [
        ("Annotations/z.xml", "dog", "second annotation of one image (JPEGImages/0.jpg; the first, "
                                     "Annotations/0.xml, labels it 'cat' and is used)")]
    assert storage.read_manifest(res.output)["counts"]["error_reasons"] == {"second annotation of one image": 1}

    images = tmp_path / "coco" / "images"
    for i in range(4):
        _save(_png(10 + i), str(images / f"{i}.png"))
    imgs = [{"id": i, "file_name": f"{i}.png"} for i in range(4)] + [{"id": 9, "file_name": "1.png"}]
    anns = [{"id": i, "image_id": i, "category_id": 1 + i // 2, "area": 5.0} for i in range(4)]
    anns.append({"id": 9, "image_id": 9, "category_id": 1, "area": 5.0})  # the same label twice
    ann_file = tmp_path / "coco" / "instances.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns,
                                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    res = ingest(IngestConfig(source=str(ann_file), format="coco", images_dir=str(images),
                              output=str(tmp_path / "c"), examples_per_class=1, val_per_class=0, test_per_class=1))
    rows = [r for s in ("train", "val", "test") for r in _read_split(res.output, s)]
    assert sorted((r["source_path"], r["class_name"]) for r in rows) == [
        ("0.png", "a"), ("1.png", "a"), ("2.png", "b"), ("3.png", "b")]
    errors = storage.read_parquet(storage.join(res.output, "errors")).to_pylist()
    assert [(e["item"], e["reason"]) for e in errors] == [
        ("image 9", "second annotation of one image (1.png; the first, image 1, labels it 'a' and is used)")]


def test_unreadable_coco_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ingest(IngestConfig(source=str(bad), format="coco", output=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ingest(IngestConfig(source=str(tmp_path / "nope"), output=str(tmp_path / "o2")))


def test_output_opens_in_pyarrow_pandas_ray_and_datasets(tmp_path, ray_session):
    import datasets
    import pandas as pd

    root = _folder(tmp_path, n=4)
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=2))
    files = storage.list_files(storage.join(res.output, "train"), ".parquet")
    table = pq.read_table(files[0])
    assert table.schema.field("image").type == schema.IMAGE_TYPE
    assert set(schema.REAL_COLUMNS) == set(table.column_names)
    assert len(pd.read_parquet(files[0])) == table.num_rows
    assert ray_session.data.read_parquet(files).count() == 4
    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == ["cat", "dog"]
    assert isinstance(ds[0]["image"], Image.Image)


def test_s3_source_and_output(tmp_path, s3_bucket):
    bucket = s3_bucket("ingest-bucket")
    root = _folder(tmp_path, n=4)
    storage.upload_dir(str(root), f"{bucket}/src")
    res = ingest(IngestConfig(source=f"{bucket}/src", output=f"{bucket}/real", examples_per_class=2))
    assert res.counts == {"train": 4, "val": 2, "test": 2}
    assert len(storage.read_parquet(f"{bucket}/real/train")) == 4
    assert storage.read_manifest(f"{bucket}/real")["counts"]["splits"]["train"] == 4


def test_load_image_file_keeps_rgb_originals_and_reencodes_the_rest():
    buf = io.BytesIO()
    _png(1).save(buf, format="PNG")
    data, w, h, digest = load_image_file(buf.getvalue())
    assert data == buf.getvalue() and (w, h) == (20, 16)
    gray = io.BytesIO()
    _png(1, mode="L").save(gray, format="PNG")
    data2, *_ = load_image_file(gray.getvalue())
    assert Image.open(io.BytesIO(data2)).mode == "RGB"
    small, w2, h2, _ = load_image_file(buf.getvalue(), max_size=10)
    assert (w2, h2) == (10, 8)
    with pytest.raises(ValueError, match="zero-byte"):
        load_image_file(b"")


# ---- fixed val/test, nested train (the paper's protocol) ---------------------------------------


def test_split_rule_over_shots_and_seeds():
    """For k in 1..16 and seeds 0-9 on 20 images per class: no train image is ever in val or test,
    val/test are identical everywhere, and train(k) is a prefix of train(2k)."""
    from ray_dafusion.ingest import split_class

    keys = [f"cat/{i:02d}.png" for i in range(20)]
    reference = None
    for seed in range(10):
        previous = None
        for k in (1, 2, 4, 8, 16):
            parts = split_class(keys, {}, IngestConfig(examples_per_class=k, seed=seed, val_per_class=2,
                                                       test_per_class=2))
            held = set(parts["val"]) | set(parts["test"])
            assert not held & set(parts["train"]) and len(parts["train"]) == k
            assert sorted(parts["train"] + parts["val"] + parts["test"] + parts["unused"]) == keys
            if reference is None:
                reference = (parts["val"], parts["test"])
            assert (parts["val"], parts["test"]) == reference
            if previous is not None:
                assert parts["train"][: len(previous)] == previous
            previous = parts["train"]
    assert len(reference[0]) == len(reference[1]) == 2
    # another split_seed draws other val/test; the default sizes are a quarter of the class each
    other = split_class(keys, {}, IngestConfig(examples_per_class=1, split_seed=1, val_per_class=2, test_per_class=2))
    assert (other["val"], other["test"]) != reference
    default = split_class(keys, {}, IngestConfig(examples_per_class=10))
    assert (len(default["val"]), len(default["test"]), len(default["train"])) == (5, 5, 10)


def test_source_given_splits_are_kept(tmp_path):
    root = _given(tmp_path, {"train": 6, "val": 2, "test": 3}, seed=100)
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=4))
    assert res.classes == ["cat", "dog"] and res.counts == {"train": 8, "val": 4, "test": 6}
    for split in ("train", "val", "test"):
        assert {r["source_path"].split("/")[0] for r in _read_split(res.output, split)} == {split}
    # only train/ and test/ given: val is drawn from the given train split, fixed by split_seed
    (root / "val").rename(tmp_path / "val-aside")
    a = ingest(IngestConfig(source=str(root), output=str(tmp_path / "a"), examples_per_class=1, val_per_class=2))
    b = ingest(IngestConfig(source=str(root), output=str(tmp_path / "b"), examples_per_class=3, val_per_class=2, seed=5))
    val_a = {r["source_path"] for r in _read_split(a.output, "val")}
    assert val_a == {r["source_path"] for r in _read_split(b.output, "val")} and len(val_a) == 4
    assert all(p.startswith("train/") for p in val_a)
    assert not val_a & {r["source_path"] for r in _read_split(b.output, "train")}


def test_hidden_and_macos_folders_are_neither_classes_nor_splits(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ray_dafusion")
    root = _given(tmp_path, {"train": 3, "val": 3, "test": 3}, seed=300)
    (root / ".ipynb_checkpoints").mkdir()  # empty, as Jupyter leaves it
    _save(_png(900), str(root / "__MACOSX" / "train" / "cat" / "0.png"))
    _save(_png(901), str(root / "train" / ".ipynb_checkpoints" / "0-checkpoint.png"))
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=1))
    assert res.classes == ["cat", "dog"] and res.counts == {"train": 2, "val": 6, "test": 6}
    assert res.skipped == {"in_ignored_folders": 2, "unused": 4} and res.errors == 0
    assert storage.read_manifest(res.output)["counts"]["empty_classes"] == []
    assert "ignoring the folders .ipynb_checkpoints/, __MACOSX/, train/.ipynb_checkpoints/" in caplog.text
    # the same beside class folders
    flat = _folder(tmp_path, n=4)
    _save(_png(902), str(flat / ".git" / "x.png"))
    # and inside a class folder (a notebook's checkpoint copy), and hidden files (.DS_Store) beside images
    _save(_png(903), str(flat / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png"))
    (flat / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    res = ingest(IngestConfig(source=str(flat), output=str(tmp_path / "f"), examples_per_class=1))
    assert res.classes == ["cat", "dog"] and res.errors == 0
    assert res.skipped["in_ignored_folders"] == 2 and res.skipped["hidden_files"] == 1
    assert res.counts["train"] + res.counts["val"] + res.counts["test"] + res.skipped["unused"] == 8


def test_split_names_beside_class_folders_are_classes_and_val_alone_is_refused(tmp_path, caplog):
    root = tmp_path / "classes"  # VOC and COCO have a class called train
    for i, name in enumerate(("train", "bird", "cat")):
        for j in range(3):
            _save(_png(10 * i + j), str(root / name / f"{j}.png"))
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "c"), examples_per_class=1))
    assert res.classes == ["bird", "cat", "train"] and res.counts["train"] == 3
    assert "the folders train/ are read as classes" in caplog.text
    root = tmp_path / "given"
    _save(_png(2), str(root / "val" / "cat" / "0.png"))
    with pytest.raises(ConfigError, match=r"has val/ but no train/"):
        ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=1))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_given_val_and_test_beyond_their_sizes_are_counted_unused(tmp_path):
    root = _given(tmp_path, {"train": 6, "val": 4, "test": 4}, seed=500)
    res = ingest(IngestConfig(source=str(root), output=str(tmp_path / "o"), examples_per_class=2,
                              val_per_class=1, test_per_class=1))
    assert res.counts == {"train": 4, "val": 2, "test": 2}
    # per class: 4 of the train pool beyond k, 3 given val and 3 given test beyond their sizes
    assert res.skipped == {"unused": 20}
    counts = storage.read_manifest(res.output)["counts"]
    assert sum(counts["splits"].values()) + counts["skipped"]["unused"] == 28  # every source image


def test_voc_image_sets_and_coco_holdout_give_val_and_test(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    stems = {"train": [], "val": []}
    for i in range(12):
        _save(_png(200 + i), str(root / "JPEGImages" / f"{i}.jpg"), fmt="JPEG")
        (root / "Annotations" / f"{i}.xml").write_text(_voc_xml(f"{i}.jpg", [("cat" if i % 2 else "dog", (0, 0, 9, 9))]))
        stems["train" if i < 8 else "val"].append(str(i))
    for name, listed in stems.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(listed) + "\n")
    res = ingest(IngestConfig(source=str(root), format="voc", output=str(tmp_path / "o"), examples_per_class=2))
    assert res.counts == {"train": 4, "val": 2, "test": 2}  # VOC's val halves into val and test
    held = {r["source_path"] for s in ("val", "test") for r in _read_split(res.output, s)}
    assert held == {f"JPEGImages/{i}.jpg" for i in range(8, 12)}

    images = tmp_path / "coco"
    def coco(name, ids):
        imgs, anns = [], []
        for i in ids:
            _save(_png(300 + i), str(images / name / f"{i}.png"))
            imgs.append({"id": i, "file_name": f"{i}.png"})
            anns.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "area": 10.0})
        path = images / f"{name}.json"
        path.write_text(json.dumps({"images": imgs, "annotations": anns,
                                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
        return str(path)
    train_json, val_json = coco("train", range(6)), coco("val", range(6, 14))
    res = ingest(IngestConfig(source=train_json, format="coco", images_dir=str(images / "train"),
                              holdout_source=val_json, holdout_images_dir=str(images / "val"),
                              output=str(tmp_path / "c"), examples_per_class=2))
    assert res.counts == {"train": 4, "val": 4, "test": 4}
    assert {r["source_path"].split("/")[0] for s in ("val", "test") for r in _read_split(res.output, s)} == {"holdout"}


def test_a_subset_of_a_pool_equals_a_direct_ingest(tmp_path):
    """format real: a sweep ingests once (examples_per_class null: the whole pool) and takes k-shot
    subsets per (shots, seed) by copying rows; each equals what a direct ingest would write."""
    root = _folder(tmp_path, n=10)
    pool = ingest(IngestConfig(source=str(root), output=str(tmp_path / "pool"), examples_per_class=None))
    assert pool.counts == {"train": 12, "val": 4, "test": 4}
    for k, seed in ((1, 0), (3, 7)):
        direct = ingest(IngestConfig(source=str(root), output=str(tmp_path / f"direct-{k}-{seed}"),
                                     examples_per_class=k, seed=seed))
        subset = ingest(IngestConfig(source=pool.output, format="real", output=str(tmp_path / f"sub-{k}-{seed}"),
                                     examples_per_class=k, seed=seed))
        for split in ("train", "val", "test"):
            assert sorted(r["id"] for r in _read_split(subset.output, split)) == \
                sorted(r["id"] for r in _read_split(direct.output, split)), (k, seed, split)
        a, b = storage.read_manifest(direct.output), storage.read_manifest(subset.output)
        assert a["split_fingerprints"] == b["split_fingerprints"] and a["classes"] == b["classes"]
        assert subset.counts == direct.counts
    with pytest.raises(ValueError, match="examples_per_class: null to take k-shot subsets"):
        ingest(IngestConfig(source=str(tmp_path / "direct-1-0"), format="real", output=str(tmp_path / "x"),
                            examples_per_class=1))


def test_a_storage_failure_is_not_quarantined_as_a_bad_image(monkeypatch, tmp_path):
    """A throttled or dropped read is the store's failure: the task fails (Ray retries it) instead of
    the image being quarantined and lost for good; a file that is not an image is quarantined."""
    import numpy as np

    from ray_dafusion import pretrain, storage
    from ray_dafusion.ingest import _decode

    (tmp_path / "junk.png").write_bytes(b"not an image")
    batch = {"key": np.array(["k"]), "uri": np.array([str(tmp_path / "junk.png")]), "class_name": np.array(["cat"])}
    assert "not a readable image" in _decode(batch, None, None)["error"][0]

    def throttled(uri, endpoint_url=None):
        raise storage.StorageError(f"{uri}: SlowDown (throttled)")

    monkeypatch.setattr(storage, "read_bytes", throttled)
    with pytest.raises(storage.StorageError, match="SlowDown"):
        _decode(batch, None, None)
    with pytest.raises(storage.StorageError, match="SlowDown"):
        pretrain._decode({"uri": np.array([str(tmp_path / "junk.png")])}, 8, None)
