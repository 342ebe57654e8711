"""Gallery: a PNG contact sheet of an augment output, for a person to look at.

Each row is one real image followed by its augmentations in aug_index order, each thumbnail
captioned (the real one with its class, the synthetic ones with their t0). With `score`, each
augmentation is captioned with a stored quality score too, the row is sorted best first, and
images below `threshold` are framed in red: what a train-time filter would drop. Reads only the
rows of the sources shown, not the whole synthetic set.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Optional

import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image, ImageDraw, ImageFont

from . import schema, storage
from .config import GalleryConfig, callable_stage_module

__all__ = ["GalleryResult", "gallery", "sheet_size", "PAD", "CAPTION_HEIGHT"]

PAD = 4
"""Pixels between thumbnails and around the sheet."""
CAPTION_HEIGHT = 14
"""Pixels under each thumbnail for its caption."""

log = logging.getLogger(__name__)


@dataclass
class GalleryResult:
    """Where the sheet went and what it shows."""

    output: str
    sources: int
    augmentations: int
    width: int
    height: int


def sheet_size(num_sources: int, columns: int, thumb_size: int) -> tuple[int, int]:
    """(width, height) of a sheet of `num_sources` rows of `columns` thumbnails."""
    return (PAD + columns * (thumb_size + PAD), PAD + num_sources * (thumb_size + CAPTION_HEIGHT + PAD))


def _read_rows(uri: str, columns: list[str], key: str, values: list[str], endpoint_url: Optional[str]):
    fs, path = storage.resolve(uri, endpoint_url)
    paths = [storage.resolve(f, endpoint_url)[1] for f in storage.parquet_files(uri, endpoint_url)]
    if not paths:
        raise FileNotFoundError(f"no parquet files under {uri}")
    dataset = pads.dataset(paths, filesystem=fs, format="parquet")
    return dataset.to_table(columns=columns, filter=pc.field(key).isin(values)).to_pylist()


def _thumb(data: bytes, size: int) -> Image.Image:
    image = schema.decode_image(data)
    scale = size / max(image.size)  # small images are enlarged too, so they can be seen
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def _fit(options: tuple[str, ...], width: int) -> str:
    """The first caption that fits in `width` characters (the last one, cut, if none does)."""
    return next((o for o in options if len(o) <= width), options[-1][:width])


def _best_first(value: Optional[float], aug_index: int) -> tuple[int, float, int]:
    """Sort key of an augmentation by its score: best first, then those without a score or with a
    NaN one (which compares with nothing); ties (top1_is_label is all 0 or 1) in aug_index order,
    not in the order the files were read."""
    if value is None or math.isnan(value):
        return (1, 0.0, aug_index)
    return (0, -value, aug_index)


def _scores(cfg: GalleryConfig, ids: list[str]) -> dict[str, float]:
    """id -> the value of `cfg.score` for the shown images."""
    from .score import read_scores, scores_dir

    scorer, column = cfg.score.split(".")
    manifest = storage.read_manifest(scores_dir(cfg.synthetic, scorer), cfg.endpoint_url)
    if manifest is None:
        raise FileNotFoundError(f"gallery score {cfg.score}: no complete {scorer} scores for {cfg.synthetic}; "
                                "run `ray-dafusion score` first")
    if column not in manifest.get("columns", {}):
        raise ValueError(f"gallery score {cfg.score}: {scorer} scores have {', '.join(manifest.get('columns', {}))}, "
                         f"not {column!r}")
    table = read_scores(cfg.synthetic, scorer, [column], cfg.endpoint_url)
    wanted = set(ids)
    return {i: float(v) for i, v in zip(table.column("id").to_pylist(), table.column(column).to_pylist()) if i in wanted}


def gallery(cfg: GalleryConfig) -> GalleryResult:
    """Write the contact sheet of `cfg.synthetic` to `cfg.output` (default <synthetic>/gallery.png)."""
    cfg.require("synthetic")
    ep = cfg.endpoint_url

    # 1. the augment output and the real data set it came from
    manifest = storage.read_manifest(cfg.synthetic, ep)
    if manifest is None:
        raise FileNotFoundError(f"{cfg.synthetic} holds no complete augment output (no {storage.MANIFEST})")
    if manifest.get("stage") != "augment":
        raise ValueError(f"{cfg.synthetic} is not an augment output (its {storage.MANIFEST} was written by "
                         f"{manifest.get('stage') or 'no known stage'}): give the gallery an augment output")
    real = cfg.real or manifest.get("real") or manifest.get("config", {}).get("real")
    if not real:
        raise ValueError(f"the manifest of {cfg.synthetic} names no real data set; pass --real")
    data_dir = storage.join(cfg.synthetic, "data")
    if (manifest.get("counts") or {}).get("synthetic_rows") == 0:
        errors = (manifest.get("counts") or {}).get("errors")
        raise ValueError(f"{cfg.synthetic} holds no synthetic images: augment quarantined every source "
                         f"({errors} errors); their reasons are in {storage.join(cfg.synthetic, 'errors')}")

    # 2. the first max_sources sources (by id) and their augmentations
    ids = storage.read_parquet(data_dir, ep, columns=["source_id"]).column("source_id")
    chosen = sorted(set(ids.to_pylist()))[: cfg.max_sources]
    synthetic = _read_rows(data_dir, ["id", "source_id", "aug_index", "strength", "image"], "source_id", chosen, ep)
    scores = _scores(cfg, [r["id"] for r in synthetic]) if cfg.score else {}
    originals = {
        r["id"]: r
        for r in _read_rows(storage.join(real, "train"), ["id", "class_name", "image"], "id", chosen, ep)
    }
    by_source: dict[str, list[dict]] = {sid: [] for sid in chosen}
    for row in synthetic:
        by_source[row["source_id"]].append(row)
    columns = 1 + max((len(v) for v in by_source.values()), default=0)

    # 3. draw: real image first, then its augmentations, each captioned
    t = cfg.thumb_size
    width, height = sheet_size(len(chosen), columns, t)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    fits = max(4, t // 6)  # characters of the default font under one thumbnail
    for r, sid in enumerate(chosen):
        y = PAD + r * (t + CAPTION_HEIGHT + PAD)
        source = originals.get(sid)
        cells = [(source["image"]["bytes"], source["class_name"], None) if source else (None, "real: missing", None)]
        row = by_source[sid]
        if scores:  # best first, so what a threshold drops sits at the end of the row
            row = sorted(row, key=lambda a: _best_first(scores.get(a["id"]), a["aug_index"]))
        else:
            row = sorted(row, key=lambda a: a["aug_index"])
        for a in row:
            value = scores.get(a["id"])
            caption = (f"t0={a['strength']:g}", f"{a['strength']:g}") if value is None else \
                (f"{a['strength']:g} {value:.2f}", f"{value:.2f}")
            cells.append((a["image"]["bytes"], _fit(caption, fits), value))
        for c, (data, caption, value) in enumerate(cells):
            x = PAD + c * (t + PAD)
            if data is not None:
                sheet.paste(_thumb(data, t), (x, y))
            # `not >=`: a NaN score fails the filter `score >= threshold` too
            if value is not None and cfg.threshold is not None and not value >= cfg.threshold:
                draw.rectangle([x - 1, y - 1, x + t, y + t], outline=(220, 0, 0), width=2)
            draw.text((x + 1, y + t + 1), caption[:fits], fill=(0, 0, 0), font=font)

    # 4. write the PNG
    output = cfg.output or storage.join(cfg.synthetic, "gallery.png")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(output, buf.getvalue(), ep)
    log.info("%d real images with %d augmentations: %s", len(chosen), len(synthetic), output)
    return GalleryResult(output=output, sources=len(chosen), augmentations=len(synthetic), width=width, height=height)


callable_stage_module(__name__)  # `from ray_dafusion import gallery` may give this module: call it as the stage
