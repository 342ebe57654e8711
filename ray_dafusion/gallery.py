"""Gallery: a PNG contact sheet of an augment output, for a person to look at.

Each row is one real image followed by its augmentations in aug_index order, each thumbnail
captioned (the real one with its class, the synthetic ones with their t0). Reads only the rows
of the sources shown, not the whole synthetic set.
"""

from __future__ import annotations

import io
import logging
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


def gallery(cfg: GalleryConfig) -> GalleryResult:
    """Write the contact sheet of `cfg.synthetic` to `cfg.output` (default <synthetic>/gallery.png)."""
    cfg.require("synthetic")
    ep = cfg.endpoint_url

    # 1. the augment output and the real data set it came from
    manifest = storage.read_manifest(cfg.synthetic, ep)
    if manifest is None:
        raise FileNotFoundError(f"{cfg.synthetic} holds no complete augment output (no {storage.MANIFEST})")
    real = cfg.real or manifest.get("real") or manifest.get("config", {}).get("real")
    if not real:
        raise ValueError(f"the manifest of {cfg.synthetic} names no real data set; pass --real")
    data_dir = storage.join(cfg.synthetic, "data")

    # 2. the first max_sources sources (by id) and their augmentations
    ids = storage.read_parquet(data_dir, ep, columns=["source_id"]).column("source_id")
    chosen = sorted(set(ids.to_pylist()))[: cfg.max_sources]
    synthetic = _read_rows(data_dir, ["source_id", "aug_index", "strength", "image"], "source_id", chosen, ep)
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
        cells = [(source["image"]["bytes"], source["class_name"]) if source else (None, "real: missing")]
        cells += [(a["image"]["bytes"], _fit((f"t0={a['strength']:g}", f"{a['strength']:g}"), fits))
                  for a in sorted(by_source[sid], key=lambda a: a["aug_index"])]
        for c, (data, caption) in enumerate(cells):
            x = PAD + c * (t + PAD)
            if data is not None:
                sheet.paste(_thumb(data, t), (x, y))
            draw.text((x + 1, y + t + 1), caption[:fits], fill=(0, 0, 0), font=font)

    # 4. write the PNG
    output = cfg.output or storage.join(cfg.synthetic, "gallery.png")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(output, buf.getvalue(), ep)
    log.info("%d real images with %d augmentations: %s", len(chosen), len(synthetic), output)
    return GalleryResult(output=output, sources=len(chosen), augmentations=len(synthetic), width=width, height=height)


callable_stage_module(__name__)  # `from ray_dafusion import gallery` may give this module: call it as the stage
