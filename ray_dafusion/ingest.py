"""Ingest: labelled images (folder, VOC or COCO) -> real/{train,val,test} parquet shards.

Decoding, validation and writing run as Ray Data tasks; the driver only lists files and decides
the splits from small metadata columns. Every file ends up in a split, in the errors table with
its reason, or in a counted skip (COCO/VOC images without objects); nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from . import schema, storage
from .config import ConfigError, IngestConfig, callable_stage_module
from .configlib import config_fingerprint
from .runinfo import versions
from .tokens import class_token

__all__ = ["ingest", "IngestResult", "load_image_file", "SPLITS"]

SPLITS = ("train", "val", "test")
_KEEP_FORMATS = {"PNG", "JPEG"}

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What ingest wrote: the output URI, the class table and counts per split."""

    output: str
    classes: list[str]
    counts: dict[str, int]
    errors: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False


# ---- decoding one file -------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without surprises (alpha over white, 16-bit scaled)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max(initial=0)), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image_file(data: bytes, max_size: Optional[int] = None) -> tuple[bytes, int, int, str]:
    """Validate and normalise one image file.

    Returns (encoded bytes, width, height, sha256 of the RGB pixels). RGB PNG/JPEG files keep their
    original bytes; anything else (other modes, EXIF rotation, oversize) is re-encoded as PNG.
    Raises ValueError with the reason when the bytes are not a usable image.
    """
    import io

    if not data:
        raise ValueError("zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image has no pixels ({img.width}x{img.height})")
    original_mode = img.mode
    rotated = ImageOps.exif_transpose(img)
    rgb = _to_rgb(rotated)
    resized = False
    if max_size and max(rgb.size) > max_size:
        scale = max_size / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
        resized = True
    keep = fmt in _KEEP_FORMATS and original_mode == "RGB" and rotated is img and not resized
    encoded = data if keep else schema.encode_image(rgb)
    digest = hashlib.sha256(rgb.tobytes() + f"{rgb.width}x{rgb.height}".encode()).hexdigest()
    return encoded, rgb.width, rgb.height, digest


# ---- listing: folder / VOC / COCO -----------------------------------------------------------


def _list_folder(cfg: IngestConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    fs, root = storage.resolve(cfg.source, cfg.endpoint_url)
    import pyarrow.fs as pafs

    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"ingest source {cfg.source} is not a directory (format: folder expects root/<class>/*)")
    items, errors = [], []
    class_dirs = storage.list_dirs(cfg.source, cfg.endpoint_url)
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(entry.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
        parts = rel.split("/")
        if len(parts) < 2:
            errors.append({"stage": "ingest", "item": rel, "class_name": None,
                           "reason": "file at the top level, not inside a class folder"})
            continue
        items.append({"key": rel, "uri": storage.join(cfg.source, rel), "class_name": parts[0], "annotation": None})
    return items, errors, class_dirs


def _voc_largest(xml_bytes: bytes) -> tuple[Optional[str], Optional[str], int]:
    """(class of the largest object by box area, image file name, number of objects)."""
    root = ET.fromstring(xml_bytes)
    filename = (root.findtext("filename") or "").strip() or None
    best, best_area, n = None, -1.0, 0
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            continue
        x0, y0, x1, y1 = (float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        n += 1
        if area > best_area:
            best, best_area = name, area
    return best, filename, n


def _list_voc(cfg: IngestConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    ann_dir = storage.join(cfg.source, "Annotations")
    img_dir = cfg.images_dir or storage.join(cfg.source, "JPEGImages")
    xmls = storage.list_files(ann_dir, "", cfg.endpoint_url)
    if not xmls:
        raise FileNotFoundError(f"no annotation files under {ann_dir} (format: voc expects Annotations/*.xml, JPEGImages/)")
    items, errors, no_objects = [], [], 0
    for xml_uri in xmls:
        name = posixpath.basename(xml_uri)
        try:
            label, filename, n = _voc_largest(storage.read_bytes(xml_uri, cfg.endpoint_url))
        except Exception as exc:
            errors.append({"stage": "ingest", "item": f"Annotations/{name}", "class_name": None,
                           "reason": f"unreadable annotation file ({type(exc).__name__}: {exc})"})
            continue
        if label is None:
            no_objects += 1
            continue
        filename = filename or os.path.splitext(name)[0] + ".jpg"
        items.append({"key": f"JPEGImages/{filename}", "uri": storage.join(img_dir, filename),
                      "class_name": label, "annotation": f"Annotations/{name}"})
    return items, errors, no_objects


def _list_coco(cfg: IngestConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    try:
        data = json.loads(storage.read_bytes(cfg.source, cfg.endpoint_url))
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file not found: {cfg.source}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"COCO annotation file {cfg.source} is not valid JSON: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO annotation file {cfg.source} has no '{key}' list")
    img_dir = cfg.images_dir or posixpath.dirname(cfg.source.rstrip("/")) or "."
    categories = {c["id"]: c["name"] for c in data["categories"]}
    largest: dict[Any, tuple[float, Any]] = {}
    errors = []
    for ann in data["annotations"]:
        img_id, cat, area = ann.get("image_id"), ann.get("category_id"), ann.get("area")
        if cat not in categories or not isinstance(area, (int, float)):
            errors.append({"stage": "ingest", "item": f"annotation {ann.get('id')}", "class_name": None,
                           "reason": f"annotation with unknown category {cat!r} or no area"})
            continue
        if img_id not in largest or area > largest[img_id][0]:
            largest[img_id] = (float(area), cat)
    items, no_objects = [], 0
    for img in data["images"]:
        if img.get("id") not in largest:
            no_objects += 1
            continue
        fname = img["file_name"]
        items.append({"key": fname, "uri": storage.join(img_dir, fname),
                      "class_name": categories[largest[img["id"]][1]], "annotation": None})
    return items, errors, no_objects


# ---- Ray Data steps -------------------------------------------------------------------------


def _decode(batch: dict[str, np.ndarray], endpoint_url: Optional[str], max_size: Optional[int]) -> dict[str, list]:
    """Read, validate and normalise a batch of listed files (runs in Ray tasks)."""
    out: dict[str, list] = defaultdict(list)
    for key, uri, cls in zip(batch["key"], batch["uri"], batch["class_name"]):
        data, width, height, digest, error = None, 0, 0, None, None
        try:
            raw = storage.read_bytes(str(uri), endpoint_url)
            data, width, height, digest = load_image_file(raw, max_size)
        except FileNotFoundError:
            error = "image file listed by the annotations does not exist"
        except ValueError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"unreadable file ({exc})"
        out["key"].append(str(key))
        out["class_name"].append(str(cls))
        out["data"].append(data)
        out["width"].append(width)
        out["height"].append(height)
        out["sha256"].append(digest)
        out["error"].append(error)
    return dict(out)


def _assign_split(batch: pa.Table, assign: dict[str, tuple[str, int, str]]) -> pa.Table:
    """Attach split, label and id to kept rows; drop quarantined ones (already in the errors table)."""
    keys = batch.column("key").to_pylist()
    keep = [i for i, k in enumerate(keys) if k in assign]
    batch = batch.take(keep)
    picked = [assign[keys[i]] for i in keep]
    return (batch.append_column("split", pa.array([p[0] for p in picked], pa.string()))
                 .append_column("label", pa.array([p[1] for p in picked], pa.int64()))
                 .append_column("id", pa.array([p[2] for p in picked], pa.string())))


def _write_shard(batch: pa.Table, output: str, split: str, class_names: list[str],
                 endpoint_url: Optional[str]) -> dict[str, list]:
    """Write rows of one split as one real-schema parquet file, named after its ids."""
    rows = sorted(
        ({"id": r["id"], "image": schema.image_cell(r["data"], r["key"]), "label": r["label"],
          "class_name": class_names[r["label"]], "source_path": r["key"], "sha256": r["sha256"],
          "width": r["width"], "height": r["height"]} for r in batch.to_pylist()),
        key=lambda r: r["id"],
    )
    name = hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]
    uri = storage.join(output, split, f"part-{name}.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schema.real_schema(class_names)), uri, endpoint_url)
    return {"file": [uri], "rows": [len(rows)]}


# ---- the stage --------------------------------------------------------------------------------


def _split_class(keys: list[str], cfg: IngestConfig) -> dict[str, list[str]]:
    """Seeded permutation per class: train is its first k, so smaller subsets nest in larger."""
    keys = sorted(keys)
    order = [keys[i] for i in np.random.default_rng(cfg.seed).permutation(len(keys))]
    k = min(cfg.examples_per_class, len(order))
    rest = order[k:]
    n_val = cfg.val_per_class if cfg.val_per_class is not None else len(rest) // 2
    n_val = min(n_val, len(rest))
    n_test = cfg.test_per_class if cfg.test_per_class is not None else len(rest) - n_val
    return {"train": order[:k], "val": rest[:n_val], "test": rest[n_val:n_val + n_test]}


def ingest(cfg: IngestConfig) -> IngestResult:
    """Read labelled images, validate them, split them per class and write parquet shards."""
    import ray
    from ray.data.expressions import col

    cfg.require("source", "output")
    started = time.time()
    config_fp = config_fingerprint(cfg)
    done = storage.ensure_fresh_output(cfg.output, "ingest", config_fp, cfg.overwrite, cfg.endpoint_url)
    if done is not None:
        log.info("%s is complete (same config); nothing to do", cfg.output)
        return IngestResult(cfg.output, [c["name"] for c in done["classes"]], done["counts"]["splits"],
                            done["counts"]["errors"], done["counts"].get("skipped", {}), 0.0, reused=True)
    for split in (*SPLITS, "errors"):  # leftovers of an interrupted run of the same config
        storage.delete(storage.join(cfg.output, split), cfg.endpoint_url)

    # 1. list the source (paths and class names only)
    skipped: dict[str, int] = {}
    class_dirs: list[str] = []
    if cfg.format == "folder":
        items, errors, class_dirs = _list_folder(cfg)
    elif cfg.format == "voc":
        items, errors, skipped["no_objects"] = _list_voc(cfg)
    else:
        items, errors, skipped["no_objects"] = _list_coco(cfg)
    if cfg.classes is not None:
        wanted = set(cfg.classes)
        missing = sorted(wanted - {i["class_name"] for i in items} - set(class_dirs))
        if missing:
            raise ConfigError(f"config field 'classes': not found in {cfg.source}: {', '.join(missing)}")
        skipped["other_classes"] = sum(i["class_name"] not in wanted for i in items)
        items = [i for i in items if i["class_name"] in wanted]
        class_dirs = [c for c in class_dirs if c in wanted]
    listing_errors = len(errors)
    if not items:
        raise ValueError(f"no images found in {cfg.source} (format: {cfg.format})")
    log.info("%d files listed from %s", len(items), cfg.source)

    # 2. decode and validate in parallel; only small metadata comes back to the driver
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 64, 64)))
    decoded = ds.map_batches(
        _decode, fn_kwargs={"endpoint_url": cfg.endpoint_url, "max_size": cfg.max_image_size},
        batch_size=32, num_cpus=0.5,
    ).materialize()
    meta = decoded.select_columns(["key", "class_name", "sha256", "error"]).take_all()

    # 3. quarantine bad files and duplicates; decide splits per class
    by_class: dict[str, list[str]] = defaultdict(list)
    first_seen: dict[str, tuple[str, str]] = {}
    dup_classes: dict[str, set[str]] = defaultdict(set)
    for row in sorted(meta, key=lambda r: r["key"]):
        key, cls, digest = row["key"], row["class_name"], row["sha256"]
        if row["error"] is not None:
            errors.append({"stage": "ingest", "item": key, "class_name": cls, "reason": row["error"]})
            continue
        dup_classes[digest].add(cls)
        if digest in first_seen:
            errors.append({"stage": "ingest", "item": key, "class_name": cls,
                           "reason": f"duplicate of {first_seen[digest][0]} (same pixels)"})
            continue
        first_seen[digest] = (key, cls)
    for digest, (key, cls) in first_seen.items():
        if len(dup_classes[digest]) > 1:  # one image under several labels: no label can be trusted
            errors.append({"stage": "ingest", "item": key, "class_name": cls,
                           "reason": f"same image appears under several classes: {', '.join(sorted(dup_classes[digest]))}"})
        else:
            by_class[cls].append(key)

    empty = sorted(set(class_dirs) - set(by_class))
    classes = sorted(by_class)
    if not classes:
        raise ValueError(f"no usable images in {cfg.source}: all {len(meta)} files were quarantined (see errors)")
    short = {c: len(by_class[c]) for c in classes if len(by_class[c]) < cfg.examples_per_class}
    if short and not cfg.allow_fewer:
        listed = ", ".join(f"{c!r} ({n})" for c, n in sorted(short.items()))
        raise ValueError(
            f"classes with fewer usable images than examples_per_class={cfg.examples_per_class}: {listed}. "
            "Lower examples_per_class, add images, or set allow_fewer: true to train on what there is."
        )
    digest_of = {key: digest for digest, (key, _) in first_seen.items()}
    assign: dict[str, tuple[str, int, str]] = {}
    per_class: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    unused = 0
    for label, cls in enumerate(classes):
        parts = _split_class(by_class[cls], cfg)
        unused += len(by_class[cls]) - sum(len(keys) for keys in parts.values())
        for split, keys in parts.items():
            per_class[split][cls] = len(keys)
            for key in keys:
                rid = hashlib.sha256(f"{key}\n{digest_of[key]}".encode()).hexdigest()[:16]
                assign[key] = (split, label, rid)

    if unused:  # explicit val/test sizes that leave images over: counted, never dropped silently
        skipped["unused"] = unused
        log.info("%d usable images are in no split (val_per_class=%s, test_per_class=%s); counted as skipped "
                 "'unused'", unused, cfg.val_per_class, cfg.test_per_class)

    # 4. write each split as bounded shards, in parallel
    files: dict[str, list[str]] = {}
    assigned = decoded.map_batches(_assign_split, fn_kwargs={"assign": assign}, batch_format="pyarrow",
                                   num_cpus=0.5).materialize()
    for split in SPLITS:
        expected = sum(per_class[split].values())
        written = [] if not expected else assigned.filter(expr=col("split") == split).map_batches(
            _write_shard, batch_size=cfg.rows_per_file, batch_format="pyarrow", num_cpus=0.5,
            fn_kwargs={"output": cfg.output, "split": split, "class_names": classes,
                       "endpoint_url": cfg.endpoint_url},
        ).take_all()
        files[split] = sorted(w["file"] for w in written)
        if sum(w["rows"] for w in written) != expected:
            raise RuntimeError(f"ingest wrote {sum(w['rows'] for w in written)} {split} rows, expected {expected}")
    if errors:
        storage.write_parquet(schema.error_table(errors), storage.join(cfg.output, "errors", "part-00000.parquet"),
                              cfg.endpoint_url)

    # 5. the manifest goes last: it marks the output complete
    reasons: dict[str, int] = defaultdict(int)
    for e in errors:
        reasons[e["reason"].split(" (")[0] if not e["reason"].startswith("duplicate of") else "duplicate"] += 1
    counts = {
        "listed": len(items) + listing_errors,
        "splits": {s: sum(per_class[s].values()) for s in SPLITS},
        "per_class": per_class,
        "errors": len(errors),
        "error_reasons": dict(reasons),
        "skipped": skipped,
        "empty_classes": empty,
        "files": {s: len(files[s]) for s in SPLITS},
    }
    seconds = time.time() - started
    storage.write_manifest(cfg.output, {
        "stage": "ingest",
        "config": cfg.to_dict(),
        "config_fingerprint": config_fp,
        "seed": cfg.seed,
        "classes": [{"name": c, "label": i, "token": class_token(c)} for i, c in enumerate(classes)],
        "counts": counts,
        "seconds": round(seconds, 3),
        "versions": versions(),
    }, cfg.endpoint_url)
    for cls in empty:
        log.warning("class folder %r has no usable images; it is left out of the class table", cls)
    log.info("wrote %s images of %d classes to %s (%d quarantined in errors/, %d skipped) in %.1fs",
             counts["splits"], len(classes), cfg.output, len(errors), sum(skipped.values()), seconds)
    return IngestResult(cfg.output, classes, counts["splits"], len(errors), skipped, seconds)


callable_stage_module(__name__)  # `from ray_dafusion import ingest` may give this module: call it as the stage
