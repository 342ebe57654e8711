"""Every column the stages write, its type and meaning, and the image column helpers.

Images are stored encoded (PNG/JPEG bytes) in a ``{bytes, path}`` struct, the layout of the
Hugging Face ``datasets`` Image feature. The parquet schema carries the ``huggingface``
metadata key, so ``datasets.load_dataset("parquet", ...)`` decodes ``image`` to PIL and
``label`` to a ClassLabel; pandas, pyarrow and Ray Data read the same files as plain columns.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pyarrow as pa
from PIL import Image

__all__ = [
    "IMAGE_TYPE",
    "REAL_COLUMNS",
    "SYNTHETIC_COLUMNS",
    "ERROR_COLUMNS",
    "real_schema",
    "synthetic_schema",
    "error_schema",
    "with_features",
    "encode_image",
    "decode_image",
    "image_cell",
    "ClassInfo",
    "class_table",
    "read_class_table",
]

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# name -> (arrow type, Hugging Face feature dtype or None for image/label, meaning)
REAL_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "stable id: sha256 of the image bytes plus the source path, 16 hex chars"),
    "image": (IMAGE_TYPE, "encoded image {bytes, path}; RGB PNG or the original RGB JPEG"),
    "label": (pa.int64(), "class index into the manifest's class table"),
    "class_name": (pa.string(), "human-readable class name (never put in a da_fusion prompt)"),
    "source_path": (pa.string(), "where the image came from, relative to the ingest source"),
    "sha256": (pa.string(), "sha256 of the decoded pixels, used to keep splits disjoint"),
    "width": (pa.int32(), "image width in pixels"),
    "height": (pa.int32(), "image height in pixels"),
}

SYNTHETIC_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "'{source_id}-{aug_index}'"),
    "source_id": (pa.string(), "id of the real image this one was made from"),
    "aug_index": (pa.int32(), "0..M-1: which augmentation of its source"),
    "label": (pa.int64(), "class index, the source's label"),
    "class_name": (pa.string(), "class name of the source"),
    "token": (pa.string(), "learned pseudo-word in the prompt ('' in real_guidance)"),
    "strength": (pa.float64(), "t0: how far the source was noised before denoising"),
    "seed": (pa.int64(), "seed of this image's generator, from (run seed, source id, aug index)"),
    "prompt": (pa.string(), "the exact prompt used"),
    "guidance_scale": (pa.float64(), "classifier-free guidance scale"),
    "num_inference_steps": (pa.int32(), "scheduler steps for t0 = 1"),
    "model_fingerprint": (pa.string(), "hash of the diffusion model's files"),
    "embeddings_fingerprint": (pa.string(), "hash of the token embeddings file ('' when none)"),
    "erasure_fingerprint": (pa.string(), "hash of the class's erased weights ('' when none)"),
    "image": (IMAGE_TYPE, "encoded PNG {bytes, path}, resized back to the source size"),
}

ERROR_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "stage": (pa.string(), "stage that refused the item"),
    "item": (pa.string(), "file path or row id of the bad item"),
    "class_name": (pa.string(), "class it belonged to, if known"),
    "reason": (pa.string(), "why it was quarantined"),
}


def _schema(columns: dict[str, tuple[pa.DataType, str]]) -> pa.Schema:
    return pa.schema([pa.field(name, tp, nullable=True) for name, (tp, _) in columns.items()])


def with_features(schema: pa.Schema, class_names: Optional[Sequence[str]]) -> pa.Schema:
    """Attach the `huggingface` features metadata (Image and ClassLabel) to a schema."""
    features: dict[str, Any] = {}
    for f in schema:
        if f.name == "image":
            features[f.name] = {"_type": "Image"}
        elif f.name == "label" and class_names is not None:
            features[f.name] = {"_type": "ClassLabel", "names": list(class_names)}
        else:
            features[f.name] = {"_type": "Value", "dtype": _hf_dtype(f.type)}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return schema.with_metadata(meta)


def _hf_dtype(tp: pa.DataType) -> str:
    if pa.types.is_string(tp):
        return "string"
    if pa.types.is_binary(tp):
        return "binary"
    if pa.types.is_floating(tp):
        return "float64" if tp.bit_width == 64 else "float32"
    if pa.types.is_integer(tp):
        return f"int{tp.bit_width}"
    if pa.types.is_boolean(tp):
        return "bool"
    raise TypeError(f"no Hugging Face dtype for {tp}")


def real_schema(class_names: Sequence[str]) -> pa.Schema:
    return with_features(_schema(REAL_COLUMNS), class_names)


def synthetic_schema(class_names: Sequence[str]) -> pa.Schema:
    return with_features(_schema(SYNTHETIC_COLUMNS), class_names)


def error_schema() -> pa.Schema:
    return _schema(ERROR_COLUMNS)


def error_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=error_schema())


def quarantined_items(output: str, endpoint_url: Optional[str] = None) -> set[str]:
    """The `item` of every row a stage quarantined under ``<output>/errors/`` (empty when none)."""
    from . import storage

    errors_dir = storage.join(output, "errors")
    if not storage.list_files(errors_dir, ".parquet", endpoint_url):
        return set()
    return set(storage.read_parquet(errors_dir, endpoint_url, columns=["item"]).column("item").to_pylist())


# ---- image cells ------------------------------------------------------------------------


def encode_image(image: Image.Image, format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to an RGB PIL image; raises ValueError with the reason when it cannot."""
    if not data:
        raise ValueError("empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def image_cell(data: bytes, path: str) -> dict[str, Any]:
    return {"bytes": data, "path": path}


# ---- the class table of an ingest output --------------------------------------------------


@dataclass(frozen=True)
class ClassInfo:
    """One class: its name, integer label and learned-token string."""

    name: str
    label: int
    token: str


def class_table(manifest: dict[str, Any]) -> list[ClassInfo]:
    """The classes recorded in an ingest manifest, ordered by label."""
    rows = manifest.get("classes")
    if not rows:
        raise ValueError("manifest has no class table ('classes')")
    table = [ClassInfo(str(r["name"]), int(r["label"]), str(r["token"])) for r in rows]
    return sorted(table, key=lambda c: c.label)


def read_class_table(real_uri: str, endpoint_url: Optional[str] = None) -> list[ClassInfo]:
    """Classes of a complete ingest output; a clear error when it is missing or unfinished."""
    from . import storage

    manifest = storage.read_manifest(real_uri, endpoint_url)
    if manifest is None:
        raise FileNotFoundError(
            f"{real_uri} holds no complete ingest output (no {storage.MANIFEST}); run `ray-dafusion ingest` first"
        )
    return class_table(manifest)
