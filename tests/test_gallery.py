"""The gallery: a PNG contact sheet of an augment output, from Python and the command line."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ray_dafusion import schema, storage
from ray_dafusion.augment import DiffusionAugmenter
from ray_dafusion.cli import main
from ray_dafusion.config import AugmentConfig, GalleryConfig
from ray_dafusion.gallery import CAPTION_HEIGHT, PAD, gallery, sheet_size

M = 3


@pytest.fixture
def synthetic(tmp_path, make_real, tiny_model):
    """An augment output made by the actor in-process, with the manifest augment writes."""
    real = make_real(per_split={"train": 3, "val": 1, "test": 1})
    save_file({"<cat>": torch.randn(32), "<dog>": torch.randn(32)}, str(tmp_path / "t.safetensors"))
    cfg = AugmentConfig(real=real, output=str(tmp_path / "syn"), embeddings=str(tmp_path / "t.safetensors"),
                        num_augmentations=M, num_inference_steps=4, resolution=32, strengths=[0.25, 1.0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_augment: spinning threads on a shared 2-core machine
    try:
        DiffusionAugmenter(cfg, schema.read_class_table(real))(storage.read_parquet(storage.join(real, "train")))
    finally:
        torch.set_num_threads(threads)
    storage.write_manifest(cfg.output, {"stage": "augment", "real": real, "config": cfg.to_dict()})
    return cfg


def test_gallery_sheet_has_one_row_per_source_real_image_first(synthetic):
    result = gallery(GalleryConfig(synthetic=synthetic.output, max_sources=4, thumb_size=48))
    assert result.output == storage.join(synthetic.output, "gallery.png")
    sheet = Image.open(io.BytesIO(storage.read_bytes(result.output)))
    assert sheet.format == "PNG"
    assert sheet.size == sheet_size(4, 1 + M, 48) == (PAD + (1 + M) * (48 + PAD), result.height)
    assert (result.sources, result.augmentations) == (4, 4 * M)
    # the first cell of the first row is the (enlarged) real image of the first source id
    real = {r["id"]: r for r in storage.read_parquet(storage.join(synthetic.real, "train")).to_pylist()}
    first = sorted(real)[0]
    expected = np.asarray(schema.decode_image(real[first]["image"]["bytes"]).resize((48, 48), Image.BICUBIC)).astype(int)
    cell = np.asarray(sheet.convert("RGB"))[PAD : PAD + 48, PAD : PAD + 48].astype(int)
    assert np.abs(cell - expected).mean() < 2
    # and the caption strip under it is not blank (text was drawn)
    strip = np.asarray(sheet.convert("L"))[PAD + 48 : PAD + 48 + 12, PAD + 48 + PAD : PAD + 2 * (48 + PAD)]
    assert strip.min() < 128


def test_gallery_command_line_writes_png(synthetic, tmp_path, capsys):
    out = str(tmp_path / "sheet.png")
    assert main(["gallery", synthetic.output, "--output", out, "--max_sources", "2", "--thumb_size", "32"]) == 0
    assert Image.open(out).size == sheet_size(2, 1 + M, 32)
    assert "sheet.png" in capsys.readouterr().out


def test_gallery_and_report_job_scripts(synthetic, tmp_path, capsys):
    from test_cli import _job

    out = str(tmp_path / "sheet.png")
    assert _job("gallery").main([synthetic.output, "--output", out, "--max_sources", "2", "--thumb_size", "32"]) == 0
    assert Image.open(out).size == sheet_size(2, 1 + M, 32)
    assert f"gallery: {out}: 2 real images with {2 * M} augmentations" in capsys.readouterr().out
    assert _job("report").main([synthetic.output]) == 0
    printed = capsys.readouterr().out
    assert "| augment |" in printed and f"report: 1 stage outputs -> {storage.join(synthetic.output, 'report.md')}" in printed
    assert _job("gallery").main([str(tmp_path / "nothing")]) == 1  # one line on stderr, exit code 1
    assert "ray-dafusion gallery: error:" in capsys.readouterr().err


def test_gallery_refuses_incomplete_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete augment output"):
        gallery(GalleryConfig(synthetic=str(tmp_path / "nothing")))


def test_captions_keep_t0_readable_under_small_thumbnails():
    from ray_dafusion.gallery import _fit

    assert _fit(("t0=0.25", "0.25"), 16) == "t0=0.25"  # the 96 px default fits the long form
    assert _fit(("t0=0.25", "0.25"), 5) == "0.25"  # 32 px: the number alone, never "t0=0."
    assert _fit(("t0=0.25", "0.25"), 3) == "0.2"


def test_gallery_refuses_an_output_that_is_not_an_augment_one(make_real):
    real = make_real(per_split={"train": 2, "val": 1, "test": 1})
    with pytest.raises(ValueError, match=f"{real} is not an augment output \\(its manifest.json was written by ingest\\)"):
        gallery(GalleryConfig(synthetic=real))


def test_gallery_of_an_output_whose_every_source_was_quarantined_says_so(tmp_path):
    from ray_dafusion import storage

    out = str(tmp_path / "aug")
    storage.write_manifest(out, {"stage": "augment", "real": str(tmp_path / "real"),
                                 "counts": {"real_rows": 2, "synthetic_rows": 0, "errors": 2}})
    with pytest.raises(ValueError, match="holds no synthetic images: augment quarantined every source \\(2 errors\\)"):
        gallery(GalleryConfig(synthetic=out))


@pytest.fixture
def hand_made(make_real, tmp_path):
    """An augment output written without a model (augmentation a of a source is flat grey 20 a + 40
    label), its rows stored last augmentation first: a reader meets them out of aug_index order."""
    from test_train import CLASSES, write_synthetic

    real = make_real(class_names=CLASSES, per_split={"train": 1, "val": 1, "test": 1})
    out = write_synthetic(real, str(tmp_path / "hand"), m=M)
    data = storage.join(out, "data")
    table = storage.read_parquet(data)
    storage.delete(data)
    storage.write_parquet(table.take(list(reversed(range(table.num_rows)))), storage.join(data, "part-0.parquet"))
    storage.write_manifest(out, {**storage.read_manifest(out), "real": real})
    return out


def _write_scores(synthetic: str, values: dict[int, float]) -> None:
    """classifier scores as score writes them: p_label by aug_index, top1_is_label true for all."""
    from ray_dafusion.score import scores_dir

    rows = storage.read_parquet(storage.join(synthetic, "data"), columns=["id", "aug_index"]).to_pylist()
    out = scores_dir(synthetic, "classifier")
    storage.write_parquet(pa.table({"id": [r["id"] for r in rows],
                                    "p_label": [values[r["aug_index"]] for r in rows],
                                    "top1_is_label": [True] * len(rows)}), storage.join(out, "data", "part-0.parquet"))
    storage.write_manifest(out, {"stage": "score", "scorer": "classifier",
                                 "columns": {"p_label": "double", "top1_is_label": "bool"}})


def _cells(sheet_uri: str, synthetic: str, thumb: int) -> list[list[int]]:
    """Per row (source), the aug_index of each synthetic thumbnail, read from its grey level."""
    table = storage.read_parquet(storage.join(synthetic, "data"), columns=["source_id", "label"])
    labels = {r["source_id"]: r["label"] for r in table.to_pylist()}
    pixels = np.asarray(Image.open(io.BytesIO(storage.read_bytes(sheet_uri))).convert("L")).astype(int)
    rows = []
    for r, sid in enumerate(sorted(labels)):
        y = PAD + r * (thumb + CAPTION_HEIGHT + PAD) + thumb // 2
        greys = [pixels[y, PAD + c * (thumb + PAD) + thumb // 2] for c in range(1, 1 + M)]
        rows.append([round((g - 40 * labels[sid]) / 20) for g in greys])
    return rows


def test_tied_scores_keep_aug_index_order(hand_made, tmp_path):
    """classifier.top1_is_label is 1 for every image here: the row is in aug_index order, as without a
    score, not in the order the rows were stored."""
    _write_scores(hand_made, {a: 0.5 for a in range(M)})
    sheet = gallery(GalleryConfig(synthetic=hand_made, output=str(tmp_path / "tied.png"), thumb_size=16,
                                  score="classifier.top1_is_label"))
    assert sheet.sources == 3
    assert _cells(sheet.output, hand_made, 16) == [list(range(M))] * 3
    plain = gallery(GalleryConfig(synthetic=hand_made, output=str(tmp_path / "plain.png"), thumb_size=16))
    assert _cells(plain.output, hand_made, 16) == [list(range(M))] * 3


def test_a_nan_score_goes_last_and_is_framed_as_a_filter_would_drop_it(hand_made, tmp_path):
    """NaN compares with nothing: sorted by it, a row kept the order it was read in (NaN first here),
    and `value < threshold` did not frame it, while the filter `score >= threshold` drops it."""
    _write_scores(hand_made, {0: 0.2, 1: 0.9, 2: float("nan")})
    t = 16
    sheet = gallery(GalleryConfig(synthetic=hand_made, output=str(tmp_path / "nan.png"), thumb_size=t,
                                  score="classifier.p_label", threshold=0.5))
    assert _cells(sheet.output, hand_made, t) == [[1, 0, 2]] * 3
    pixels = np.asarray(Image.open(sheet.output).convert("RGB"))
    y = PAD + t // 2  # the left edge of each synthetic cell of the first row: red where framed
    framed = [bool(np.all(pixels[y, PAD + c * (t + PAD)] == [220, 0, 0])) for c in range(1, 1 + M)]
    assert framed == [False, True, True]
