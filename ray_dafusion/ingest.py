"""Ingest: labelled images (folder, VOC or COCO) -> real/{train,val,test} parquet shards.

Decoding, validation and writing run as Ray Data tasks; the driver only lists files and decides
the splits from small metadata columns. Every file ends up in a split, in the errors table with
its reason, or in a counted skip (VOC/COCO images without objects, hidden files and files under
hidden or ``__MACOSX`` folders, images beyond the split sizes); nothing is dropped silently.
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
from .configlib import config_record
from .errors import StageError
from .runinfo import CostMeter, versions
from .tokens import class_token

__all__ = ["ingest", "IngestResult", "load_image_file", "split_class", "split_fingerprint", "SPLITS"]

SPLITS = ("train", "val", "test")
_KEEP_FORMATS = {"PNG", "JPEG"}

log = logging.getLogger(__name__)

_TASK_CPUS = 0.5  # per decode and write task: leaves room for Ray Data's readers on small machines


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
#
# Each listed item is {key, uri, class_name, annotation, given}: `annotation` names the entry that
# labels it (a VOC XML, a COCO image entry; None in a folder), `given` the split the source itself
# assigns ("train", "val", "test", or "holdout" to be divided into val and test), or is None when
# the source has no splits of its own.

GIVEN_SPLITS = ("train", "val", "test")


@dataclass
class _Listing:
    items: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    class_dirs: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def _list_source(cfg: IngestConfig) -> _Listing:
    """Paths and class names only (no image is read here), filtered to `cfg.classes`."""
    if cfg.format == "folder":
        listing = _list_folder(cfg)
    elif cfg.format == "voc":
        listing = _list_voc(cfg)
    else:
        listing = _list_coco(cfg)
    _quarantine_second_annotations(listing)
    if cfg.classes is not None:
        wanted = set(cfg.classes)
        missing = sorted(wanted - {i["class_name"] for i in listing.items} - set(listing.class_dirs))
        if missing:
            raise ConfigError(f"config field 'classes': not found in {cfg.source}: {', '.join(missing)}")
        listing.skipped["other_classes"] = sum(i["class_name"] not in wanted for i in listing.items)
        listing.items = [i for i in listing.items if i["class_name"] in wanted]
        listing.class_dirs = [c for c in listing.class_dirs if c in wanted]
    if not listing.items:
        raise ValueError(f"no images found in {cfg.source} (format: {cfg.format})")
    _check_tokens(cfg.source, {i["class_name"] for i in listing.items})
    return listing


def _check_tokens(source: str, class_names: set[str]) -> None:
    """Each class needs a token of its own: two classes with one token would be prompted with one
    learned embedding (and one of them lost wherever tokens are keys)."""
    seen: dict[str, str] = {}
    for name in sorted(class_names):
        token = class_token(name)
        other = seen.setdefault(token.lower(), name)
        if other != name:
            shared = (f"the token {token}" if class_token(other) == token else
                      f"one token ({class_token(other)} and {token} differ only in case, and CLIP's tokenizer "
                      "lowercases prompts)")
            raise ValueError(
                f"classes {other!r} and {name!r} in {source} would share {shared}: a token is the class name with "
                "whitespace as '_'. Rename one of them, or leave one out with the config field 'classes'")


def _quarantine_second_annotations(listing: _Listing) -> None:
    """One row per image file: two VOC XMLs with one <filename>, or two COCO entries with one
    file_name, would give two rows one key. The first (by annotation file, or by place in the
    'images' list) labels the image; each later one goes to the errors table."""
    first: dict[str, dict[str, Any]] = {}
    kept = []
    for item in listing.items:
        seen = first.setdefault(item["key"], item)
        if seen is item:
            kept.append(item)
            continue
        listing.errors.append({"stage": "ingest", "item": item["annotation"], "class_name": item["class_name"],
                               "reason": f"second annotation of one image ({item['key']}; the first, "
                                         f"{seen['annotation']}, labels it {seen['class_name']!r} and is used)"})
    listing.items = kept


def _list_folder(cfg: IngestConfig) -> _Listing:
    """root/<class>/*, or root/{train,val,test}/<class>/* when the source gives its own splits."""
    fs, root = storage.resolve(cfg.source, cfg.endpoint_url)
    import pyarrow.fs as pafs

    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"ingest source {cfg.source} is not a directory (format: folder expects root/<class>/*)")
    top = [d for d in storage.list_dirs(cfg.source, cfg.endpoint_url) if not _ignored_folder(d)]
    given = _given_splits(cfg.source, top)
    if given:
        log.info("%s has %s/ folders: using them as the data set's own splits", cfg.source, "/, ".join(top))
    class_dirs = sorted({c for t in top for c in storage.list_dirs(storage.join(cfg.source, t), cfg.endpoint_url)
                         if not _ignored_folder(c)}) if given else top
    items, errors = [], []
    depth = 3 if given else 2
    ignored: dict[str, int] = defaultdict(int)  # ignored folder (at any depth) -> files in it
    hidden_files = 0  # .DS_Store and the like, beside the images
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = posixpath.relpath(entry.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
        parts = rel.split("/")
        is_file = entry.type == pafs.FileType.File
        folders = parts[:-1] if is_file else parts
        hidden = next((i for i, p in enumerate(folders) if _ignored_folder(p)), None)
        if hidden is not None:
            ignored["/".join(parts[:hidden + 1])] += int(is_file)
            continue
        if not is_file:
            continue
        if parts[-1].startswith("."):
            hidden_files += 1
            continue
        if len(parts) < depth:
            where = "a split folder, not inside a class folder" if given and len(parts) == 2 else "the top level"
            errors.append({"stage": "ingest", "item": rel, "class_name": None,
                           "reason": f"file at {where}, not inside a class folder"})
            continue
        items.append({"key": rel, "uri": storage.join(cfg.source, rel), "class_name": parts[depth - 2],
                      "annotation": None, "given": parts[0] if given else None})
    skipped = {"in_ignored_folders": sum(ignored.values())} if sum(ignored.values()) else {}
    if hidden_files:
        skipped["hidden_files"] = hidden_files
    if ignored:
        log.info("%s: ignoring the folders %s (hidden or __MACOSX: neither classes, splits nor images); the %d files "
                 "in them are counted as skipped 'in_ignored_folders'", cfg.source,
                 ", ".join(f"{d}/" for d in sorted(ignored)), sum(ignored.values()))
    return _Listing(items, errors, class_dirs, skipped)


def _ignored_folder(name: str) -> bool:
    """Folders that tools leave beside the data (.ipynb_checkpoints, .git, macOS zip's __MACOSX)."""
    return name.startswith(".") or name == "__MACOSX"


def _given_splits(source: str, top: list[str]) -> bool:
    """Whether the top-level folders are the data set's own splits: train/ with optional val/ and
    test/, nothing else. Beside other folders they are classes (VOC and COCO have a class `train`),
    said in a warning; val/ or test/ alone cannot be read either way and is refused."""
    splits = [d for d in top if d in GIVEN_SPLITS]
    if not splits:
        return False
    if len(splits) < len(top):
        log.warning("%s: the folders %s are read as classes, beside the other class folders (a source with its own "
                    "splits holds only train/, val/ and test/ at its top level)", source,
                    ", ".join(d + "/" for d in splits))
        return False
    if "train" not in splits:
        raise ConfigError(
            f"config field 'source': {source} has {', '.join(d + '/' for d in splits)} but no train/; a source "
            "with its own splits needs root/train/<class>/* (val/ and test/ are optional)")
    return True


def _voc_largest(xml_bytes: bytes) -> tuple[Optional[str], Optional[str], int, int]:
    """(class of the largest object by box area, image file name, number of objects, objects
    without a name or a box, which cannot label the image)."""
    root = ET.fromstring(xml_bytes)
    filename = (root.findtext("filename") or "").strip() or None
    best, best_area, n, unusable = None, -1.0, 0, 0
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            unusable += 1
            continue
        x0, y0, x1, y1 = (float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        n += 1
        if area > best_area:
            best, best_area = name, area
    return best, filename, n, unusable


def _voc_image_sets(cfg: IngestConfig) -> Optional[dict[str, str]]:
    """stem -> "train" | "holdout" from ImageSets/Main/{train,val}.txt, when both exist (VOC's own split)."""
    main = storage.join(cfg.source, "ImageSets", "Main")
    lists = {}
    for name, role in (("train.txt", "train"), ("val.txt", "holdout")):
        try:
            lists[role] = storage.read_bytes(storage.join(main, name), cfg.endpoint_url).decode().split()
        except FileNotFoundError:
            return None
    log.info("%s has ImageSets/Main/train.txt and val.txt: train from the first, val and test from the second",
             cfg.source)
    return {stem: role for role, stems in lists.items() for stem in stems}


def _list_voc(cfg: IngestConfig) -> _Listing:
    ann_dir = storage.join(cfg.source, "Annotations")
    img_dir = cfg.images_dir or storage.join(cfg.source, "JPEGImages")
    xmls = storage.list_files(ann_dir, "", cfg.endpoint_url, skip_prefixes=(".",))
    if not xmls:
        raise FileNotFoundError(f"no annotation files under {ann_dir} (format: voc expects Annotations/*.xml, JPEGImages/)")
    image_sets = _voc_image_sets(cfg)
    items, errors, no_objects, not_listed, unusable = [], [], 0, 0, 0
    for xml_uri in xmls:
        name = posixpath.basename(xml_uri)
        stem = os.path.splitext(name)[0]
        if image_sets is not None and stem not in image_sets:
            not_listed += 1
            continue
        try:
            label, filename, n, without = _voc_largest(storage.read_bytes(xml_uri, cfg.endpoint_url))
        except Exception as exc:
            errors.append({"stage": "ingest", "item": f"Annotations/{name}", "class_name": None,
                           "reason": f"unreadable annotation file ({type(exc).__name__}: {exc})"})
            continue
        unusable += without
        if label is None:
            no_objects += 1
            continue
        filename = filename or stem + ".jpg"
        items.append({"key": f"JPEGImages/{filename}", "uri": storage.join(img_dir, filename), "class_name": label,
                      "annotation": f"Annotations/{name}", "given": image_sets[stem] if image_sets else None})
    skipped = {"no_objects": no_objects, **({"not_in_image_sets": not_listed} if not_listed else {}),
               **({"objects_without_name_or_box": unusable} if unusable else {})}
    return _Listing(items, errors, skipped=skipped)


def _read_coco(uri: str, endpoint_url: Optional[str]) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_bytes(uri, endpoint_url))
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file not found: {uri}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"COCO annotation file {uri} is not valid JSON: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO annotation file {uri} has no '{key}' list")
    return data


def _coco_items(data: dict[str, Any], img_dir: str, given: Optional[str], prefix: str,
                errors: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Each image labelled by its largest annotation; (items, images without any annotation)."""
    categories = {c["id"]: c["name"] for c in data["categories"]}
    ids_of: dict[str, list[Any]] = defaultdict(list)
    for cat_id, name in categories.items():
        ids_of[name].append(cat_id)
    for name, ids in sorted(ids_of.items()):
        if len(ids) > 1:  # a class is a name (as in folders and VOC): their images are one class
            log.warning("%scategories %s share the name %r: their images are one class", prefix,
                        ", ".join(map(str, ids)), name)
    image_ids = {img.get("id") for img in data["images"]}
    largest: dict[Any, tuple[float, Any]] = {}
    for ann in data["annotations"]:
        img_id, cat, area = ann.get("image_id"), ann.get("category_id"), ann.get("area")
        reason = (f"annotation with unknown category {cat!r} or no area"
                  if cat not in categories or not isinstance(area, (int, float))
                  else f"annotation of image_id {img_id!r}, which the 'images' list does not hold"
                  if img_id not in image_ids else None)
        if reason is not None:
            errors.append({"stage": "ingest", "item": f"{prefix}annotation {ann.get('id')}", "class_name": None,
                           "reason": reason})
            continue
        if img_id not in largest or area > largest[img_id][0]:
            largest[img_id] = (float(area), cat)
    items, no_objects = [], 0
    for img in data["images"]:
        if img.get("id") not in largest:
            no_objects += 1
            continue
        fname = img.get("file_name")
        if not isinstance(fname, str) or not fname:
            errors.append({"stage": "ingest", "item": f"{prefix}image {img.get('id')}",
                           "class_name": categories[largest[img["id"]][1]],
                           "reason": f"image entry without a file_name (got {fname!r})"})
            continue
        items.append({"key": prefix + fname, "uri": storage.join(img_dir, fname),
                      "class_name": categories[largest[img["id"]][1]], "annotation": f"{prefix}image {img['id']}",
                      "given": given})
    return items, no_objects


def _list_coco(cfg: IngestConfig) -> _Listing:
    """The instances JSON; with `holdout_source`, its images are the train pool and the holdout's
    are divided into val and test."""
    errors: list[dict[str, Any]] = []
    img_dir = cfg.images_dir or posixpath.dirname(cfg.source.rstrip("/")) or "."
    items, no_objects = _coco_items(_read_coco(cfg.source, cfg.endpoint_url), img_dir,
                                    "train" if cfg.holdout_source else None, "", errors)
    if cfg.holdout_source:
        hold_dir = cfg.holdout_images_dir or posixpath.dirname(cfg.holdout_source.rstrip("/")) or "."
        held, held_empty = _coco_items(_read_coco(cfg.holdout_source, cfg.endpoint_url), hold_dir, "holdout",
                                       "holdout/", errors)
        items += held
        no_objects += held_empty
    return _Listing(items, errors, skipped={"no_objects": no_objects})


# ---- Ray Data steps -------------------------------------------------------------------------


def _decode(batch: dict[str, np.ndarray], endpoint_url: Optional[str], max_size: Optional[int]) -> dict[str, list]:
    """Read, validate and normalise a batch of listed files (runs in Ray tasks)."""
    out: dict[str, list] = defaultdict(list)
    started = time.perf_counter()
    for key, uri, cls in zip(batch["key"], batch["uri"], batch["class_name"]):
        data, width, height, digest, error = None, 0, 0, None, None
        try:
            raw = storage.read_bytes(str(uri), endpoint_url)
            data, width, height, digest = load_image_file(raw, max_size)
        except FileNotFoundError:
            error = "image file listed by the annotations does not exist"
        except ValueError as exc:
            error = str(exc)
        except (PermissionError, IsADirectoryError) as exc:  # the file itself: quarantined with the reason
            error = f"unreadable file ({exc})"
        # any other OSError (storage throttled, connection dropped, credentials refused) is the store's,
        # not the image's: it fails the task (Ray retries it) instead of dropping the image for good
        out["key"].append(str(key))
        out["class_name"].append(str(cls))
        out["data"].append(data)
        out["width"].append(width)
        out["height"].append(height)
        out["sha256"].append(digest)
        out["error"].append(error)
    share = (time.perf_counter() - started) / max(len(out["key"]), 1)  # this task's seconds, spread over its rows
    out["seconds"] = [share] * len(out["key"])
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
    started = time.perf_counter()
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schema.real_schema(class_names)), uri, endpoint_url)
    return {"file": [uri], "rows": [len(rows)], "seconds": [time.perf_counter() - started]}


# ---- the stage --------------------------------------------------------------------------------


def _draw(keys: list[str], seed: int) -> list[str]:
    """`keys` in the order of a seeded permutation of their sorted order."""
    keys = sorted(keys)
    return [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]


def _quarter(n: int) -> int:
    return max(1, n // 4) if n >= 3 else 0


def split_class(keys: list[str], given: dict[str, Optional[str]], cfg: IngestConfig) -> dict[str, list[str]]:
    """One class's splits: val and test fixed for the data set, train nested in k.

    - val and test: drawn by `split_seed` (from the whole class, or from a given holdout), or
      taken as the source gives them; they never depend on `examples_per_class` or `seed`.
    - the train pool: what remains (or the source's own train split).
    - train: the first k of the `seed`-permuted pool, so train(k) is a prefix of train(2k) and no
      train image of any k or seed is ever in val or test.

    Returns {"train", "val", "test", "unused"}: unused are pool images beyond k, and holdout or
    source-given val/test images beyond explicit val/test sizes (counted, never dropped silently).
    """
    by_given: dict[Optional[str], list[str]] = defaultdict(list)
    for key in keys:
        by_given[given.get(key)].append(key)
    out: dict[str, list[str]] = {"unused": []}
    if set(by_given) <= {None}:  # no splits of its own: val, test and pool all from the class
        order = _draw(by_given[None], cfg.split_seed)
        n_val = min(_size(cfg.val_per_class, _quarter(len(order))), len(order))
        n_test = min(_size(cfg.test_per_class, _quarter(len(order))), len(order) - n_val)
        out["val"], out["test"], pool = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    else:
        pool = list(by_given["train"])
        holdout = _draw(by_given["holdout"], cfg.split_seed)
        n_val = min(_size(cfg.val_per_class, len(holdout) // 2), len(holdout))
        if "val" in by_given:
            out["val"], left = _take(by_given["val"], cfg.val_per_class, cfg.split_seed)
            out["unused"] += left
        else:
            out["val"] = holdout[:n_val]
        rest = holdout[n_val:]
        if "test" in by_given:
            out["test"], left = _take(by_given["test"], cfg.test_per_class, cfg.split_seed)
        else:
            n_test = min(_size(cfg.test_per_class, len(rest)), len(rest))
            out["test"], left = rest[:n_test], rest[n_test:]
        out["unused"] += left
        for split in ("val", "test"):  # a split the source lacks is drawn from its train split
            if split not in by_given and not holdout:
                order = _draw(pool, cfg.split_seed + (0 if split == "val" else 1))
                n = min(_size(cfg.val_per_class if split == "val" else cfg.test_per_class, _quarter(len(pool))),
                        len(order))
                out[split], pool = order[:n], sorted(order[n:])
    order = _draw(pool, cfg.seed)
    k = len(order) if cfg.examples_per_class is None else min(cfg.examples_per_class, len(order))
    out["train"] = order[:k]
    out["unused"] += order[k:]
    return out


def _size(explicit: Optional[int], default: int) -> int:
    return default if explicit is None else explicit


def _take(keys: list[str], n: Optional[int], seed: int) -> tuple[list[str], list[str]]:
    """All of a given split, or `n` of them drawn by `seed`; and the ones not taken."""
    if n is None:
        return sorted(keys), []
    order = _draw(keys, seed)
    return order[:n], order[n:]


def split_fingerprint(ids: list[str]) -> str:
    """Identity of a split: a hash of its sorted row ids (which hash the pixels and the path)."""
    return storage.fingerprint(sorted(ids))


@storage.leased("ingest")
def ingest(cfg: IngestConfig) -> IngestResult:
    """Read labelled images, validate them, split them per class and write parquet shards."""
    cfg.require("source", "output")
    started = time.time()
    meter = CostMeter(cfg.cost)
    # a subset's identity includes the pool it is drawn from (its manifest's fingerprint)
    parent = (storage.read_manifest(cfg.source, cfg.endpoint_url) or {}) if cfg.format == "real" else {}
    made_of = config_record(cfg, **({"pool": parent.get("config_fingerprint")} if parent else {}))
    config_fp = storage.fingerprint(made_of)
    done = storage.ensure_fresh_output(cfg.output, "ingest", config_fp, cfg.overwrite, cfg.endpoint_url, made_of)
    if done is not None:
        log.info("%s is complete (same config); nothing to do", cfg.output)
        return IngestResult(cfg.output, [c["name"] for c in done["classes"]], done["counts"]["splits"],
                            done["counts"]["errors"], done["counts"].get("skipped", {}), 0.0, reused=True)
    for split in (*SPLITS, "errors"):  # leftovers of an interrupted run of the same config
        storage.delete(storage.join(cfg.output, split), cfg.endpoint_url)
    if cfg.format == "real":
        return _subset(cfg, config_fp, started, meter)

    # 1. list the source (paths and class names only)
    listing = _list_source(cfg)
    listed = len(listing.items) + len(listing.errors)
    log.info("%d files listed from %s", len(listing.items), cfg.source)

    # 2. decode and validate in parallel; only small metadata comes back to the driver
    decoded, meta = _decode_all(cfg, listing.items)
    meter.add_task_seconds(sum(m["seconds"] for m in meta), _TASK_CPUS)

    # 3. quarantine bad files and duplicates; decide splits per class
    by_class, digest_of = _quarantine(meta, listing.errors)
    classes = _check_classes(cfg, by_class, len(meta))
    plan = _plan_splits(cfg, classes, by_class, digest_of, {i["key"]: i.get("given") for i in listing.items})
    if plan.unused:
        listing.skipped["unused"] = plan.unused
        log.info("%d usable images are in no split (train pool beyond examples_per_class=%s, or holdout or given "
                 "val/test beyond val/test sizes); counted as skipped 'unused'", plan.unused, cfg.examples_per_class)

    # 4. write each split as bounded shards, in parallel; quarantined files to errors/
    files = _write_splits(cfg, decoded, plan, classes, meter)
    if listing.errors:
        storage.write_parquet(schema.error_table(listing.errors),
                              storage.join(cfg.output, "errors", "part-00000.parquet"), cfg.endpoint_url)

    # 5. the manifest goes last: it marks the output complete
    empty = sorted(set(listing.class_dirs) - set(by_class))
    counts = _counts(listed, plan, listing, files, empty)
    seconds = time.time() - started
    storage.write_manifest(cfg.output, {
        "stage": "ingest",
        "config": cfg.to_dict(),
        "config_fingerprint": config_fp,
        "seed": cfg.seed,
        "split_seed": cfg.split_seed,
        "split_fingerprints": {s: split_fingerprint(plan.ids[s]) for s in SPLITS},
        "classes": [{"name": c, "label": i, "token": class_token(c)} for i, c in enumerate(classes)],
        "counts": counts,
        "seconds": round(seconds, 3),
        "cost": meter.report(images=sum(counts["splits"].values())),
        "versions": versions(),
    }, cfg.endpoint_url)
    for cls in empty:
        log.warning("class folder %r has no usable images; it is left out of the class table", cls)
    log.info("wrote %s images of %d classes to %s (%d quarantined in errors/, %d skipped) in %.1fs",
             counts["splits"], len(classes), cfg.output, len(listing.errors), sum(listing.skipped.values()), seconds)
    return IngestResult(cfg.output, classes, counts["splits"], len(listing.errors), listing.skipped, seconds)


def _subset(cfg: IngestConfig, config_fp: str, started: float, meter: CostMeter) -> IngestResult:
    """format real: the k-shot train set of an earlier ingest's whole pool, by the same rule a direct
    ingest applies (first k of the `seed`-permuted pool keys per class); val, test and errors are
    copied as they are, so every subset of one pool is scored on the same images."""
    ep = cfg.endpoint_url
    parent = storage.read_manifest(cfg.source, ep)
    if parent is None or parent.get("stage") != "ingest":
        raise FileNotFoundError(f"format real: {cfg.source} is not a complete ingest output (no ingest manifest)")
    if (parent.get("config") or {}).get("examples_per_class", 0) is not None:
        raise ValueError(f"format real: {cfg.source} was made with examples_per_class "
                         f"{parent['config'].get('examples_per_class')}, not null (the whole train pool); re-ingest "
                         "the source with examples_per_class: null to take k-shot subsets of it")
    if cfg.examples_per_class is None:
        raise ConfigError("config field 'examples_per_class': format real takes a k-shot subset; give k")
    pool = storage.read_parquet(storage.join(cfg.source, "train"), ep)
    keys = pool.column("source_path").to_pylist()
    labels = pool.column("label").to_pylist()
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in zip(keys, labels):
        by_class[label].append(key)
    chosen: set[str] = set()
    per_class_train: dict[str, int] = {}
    names = [c["name"] for c in parent["classes"]]
    for label, class_keys in sorted(by_class.items()):
        picked = _draw(class_keys, cfg.seed)[: cfg.examples_per_class]
        if len(picked) < cfg.examples_per_class and not cfg.allow_fewer:
            raise ValueError(f"class {names[label]!r} has {len(picked)} images in the pool of {cfg.source}, fewer than "
                             f"examples_per_class={cfg.examples_per_class}; lower it or set allow_fewer: true")
        chosen.update(picked)
        per_class_train[names[label]] = len(picked)
    train = pool.filter(pa.array([k in chosen for k in keys])).sort_by("id")
    storage.write_parquet(train, storage.join(cfg.output, "train", "part-00000.parquet"), ep)
    for split in ("val", "test", "errors"):
        for uri in storage.list_files(storage.join(cfg.source, split), ".parquet", ep):
            storage.write_bytes(storage.join(cfg.output, split, posixpath.basename(uri)), storage.read_bytes(uri, ep), ep)
    counts = dict(parent["counts"])
    counts["splits"] = {**counts["splits"], "train": train.num_rows}
    counts["per_class"] = {**counts["per_class"], "train": per_class_train}
    counts["skipped"] = {**counts.get("skipped", {}), "unused": len(keys) - train.num_rows}
    counts["files"] = {**counts.get("files", {}), "train": 1}
    seconds = time.time() - started
    storage.write_manifest(cfg.output, {
        **{k: parent[k] for k in ("classes", "split_seed") if k in parent},
        "stage": "ingest",
        "config": cfg.to_dict(),
        "config_fingerprint": config_fp,
        "parent": {"uri": cfg.source, "config_fingerprint": parent.get("config_fingerprint")},
        "seed": cfg.seed,
        "split_fingerprints": {**parent["split_fingerprints"],
                               "train": split_fingerprint(train.column("id").to_pylist())},
        "counts": counts,
        "seconds": round(seconds, 3),
        "cost": meter.report(images=train.num_rows),
        "versions": versions(),
    }, ep)
    log.info("%d-shot subset (seed %d) of %s: %d train images, val and test as the pool's, in %s (%.1fs)",
             cfg.examples_per_class, cfg.seed, cfg.source, train.num_rows, cfg.output, seconds)
    return IngestResult(cfg.output, names, counts["splits"], counts.get("errors", 0), counts["skipped"], seconds)


def _decode_all(cfg: IngestConfig, items: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """(the decoded rows, materialised once in the object store; their small metadata columns)."""
    import ray.data

    ds = ray.data.from_items([{k: i[k] for k in ("key", "uri", "class_name")} for i in items],
                             override_num_blocks=max(1, min(len(items) // 64, 64)))
    decoded = ds.map_batches(
        _decode, fn_kwargs={"endpoint_url": cfg.endpoint_url, "max_size": cfg.max_image_size},
        batch_size=32, num_cpus=_TASK_CPUS,
    ).materialize()
    return decoded, decoded.select_columns(["key", "class_name", "sha256", "error", "seconds"]).take_all()


def _quarantine(meta: list[dict[str, Any]], errors: list[dict[str, Any]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Unreadable files, pixel duplicates and images under several classes go to `errors`;
    returns (class -> usable keys, key -> pixel digest)."""
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
    return by_class, {key: digest for digest, (key, _) in first_seen.items()}


def _check_classes(cfg: IngestConfig, by_class: dict[str, list[str]], listed: int) -> list[str]:
    classes = sorted(by_class)
    if not classes:
        raise ValueError(f"no usable images in {cfg.source}: all {listed} files were quarantined (see errors)")
    return classes


@dataclass
class _SplitPlan:
    assign: dict[str, tuple[str, int, str]]
    """key -> (split, label, id)"""
    per_class: dict[str, dict[str, int]]
    ids: dict[str, list[str]]
    unused: int


def _plan_splits(cfg: IngestConfig, classes: list[str], by_class: dict[str, list[str]], digest_of: dict[str, str],
                 given: dict[str, Optional[str]]) -> _SplitPlan:
    plans = {cls: split_class(by_class[cls], given, cfg) for cls in classes}
    wanted = cfg.examples_per_class or 1
    short = {c: len(p["train"]) for c, p in plans.items() if len(p["train"]) < wanted}
    if short and not cfg.allow_fewer:
        listed = ", ".join(f"{c!r} ({n})" for c, n in sorted(short.items()))
        raise ValueError(
            f"classes whose train pool (what val and test leave) holds fewer usable images than "
            f"examples_per_class={cfg.examples_per_class}: {listed}. Lower examples_per_class or val_per_class / "
            "test_per_class, add images, or set allow_fewer: true to train on what there is."
        )
    assign: dict[str, tuple[str, int, str]] = {}
    per_class: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    unused = 0
    for label, cls in enumerate(classes):
        unused += len(plans[cls]["unused"])
        for split in SPLITS:
            keys = plans[cls][split]
            per_class[split][cls] = len(keys)
            for key in keys:
                rid = hashlib.sha256(f"{key}\n{digest_of[key]}".encode()).hexdigest()[:16]
                assign[key] = (split, label, rid)
                ids[split].append(rid)
    return _SplitPlan(assign, per_class, ids, unused)


def _write_splits(cfg: IngestConfig, decoded: Any, plan: _SplitPlan, classes: list[str],
                  meter: CostMeter) -> dict[str, list[str]]:
    """Each split as bounded parquet shards; the decoded rows stream from the one materialised copy."""
    from ray.data.expressions import col

    files: dict[str, list[str]] = {}
    for split in SPLITS:
        expected = sum(plan.per_class[split].values())
        written = [] if not expected else decoded.map_batches(
            _assign_split, fn_kwargs={"assign": plan.assign}, batch_format="pyarrow", num_cpus=_TASK_CPUS,
        ).filter(expr=col("split") == split).map_batches(
            _write_shard, batch_size=cfg.rows_per_file, batch_format="pyarrow", num_cpus=_TASK_CPUS,
            fn_kwargs={"output": cfg.output, "split": split, "class_names": classes,
                       "endpoint_url": cfg.endpoint_url},
        ).take_all()
        files[split] = sorted(w["file"] for w in written)
        meter.add_task_seconds(sum(w["seconds"] for w in written), _TASK_CPUS)
        if sum(w["rows"] for w in written) != expected:
            raise StageError(f"ingest wrote {sum(w['rows'] for w in written)} {split} rows, expected {expected}; "
                             "re-run the same command")
    return files


def _counts(listed: int, plan: _SplitPlan, listing: _Listing, files: dict[str, list[str]],
            empty: list[str]) -> dict[str, Any]:
    reasons: dict[str, int] = defaultdict(int)
    for e in listing.errors:
        reasons[e["reason"].split(" (")[0] if not e["reason"].startswith("duplicate of") else "duplicate"] += 1
    return {
        "listed": listed,
        "splits": {s: sum(plan.per_class[s].values()) for s in SPLITS},
        "per_class": plan.per_class,
        "errors": len(listing.errors),
        "error_reasons": dict(reasons),
        "skipped": listing.skipped,
        "empty_classes": empty,
        "files": {s: len(files[s]) for s in SPLITS},
    }


callable_stage_module(__name__)  # `from ray_dafusion import ingest` may give this module: call it as the stage
