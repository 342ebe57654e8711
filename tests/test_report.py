"""The report: one table of every stage output under a workdir, from manifests written by hand."""

from __future__ import annotations

from ray_dafusion import storage
from ray_dafusion.config import ReportConfig
from ray_dafusion.report import report


def _cost(wall: float, cpu: float, estimated: float) -> dict:
    return {"wall_seconds": wall, "cpu_core_seconds": cpu, "gpu_seconds": 0.0, "peak_memory_bytes": 2**30,
            "estimated_cost": estimated, "images_per_second": 1.0}


def test_outputs_without_a_cost_record_are_named_and_the_total_says_it_is_a_lower_bound(tmp_path):
    work = str(tmp_path / "work")
    storage.write_manifest(storage.join(work, "real"), {"stage": "ingest", "counts": {"splits": {"train": 2}},
                                                        "cost": _cost(10.0, 4.0, 0.0)})
    storage.write_manifest(storage.join(work, "synthetic"), {"stage": "augment"})  # an older version: no cost
    storage.write_manifest(storage.join(work, "train", "a"), {"stage": "train", "cost": _cost(5.0, 2.0, 0.0)})
    result = report(ReportConfig(workdir=work))
    assert result.without_cost == ["synthetic"]
    assert result.totals["wall_seconds"] == 15.0 and result.totals["cpu_core_seconds"] == 6.0
    total = next(line for line in result.table.splitlines() if line.startswith("| **total**"))
    assert "1 output without cost records: a lower bound" in total
    # every output with its cost: the total row says nothing more
    storage.write_manifest(storage.join(work, "synthetic"), {"stage": "augment", "cost": _cost(1.0, 1.0, 0.0)})
    result = report(ReportConfig(workdir=work))
    assert result.without_cost == [] and "lower bound" not in result.table


def test_the_total_cost_is_the_sum_of_the_rows_as_shown(tmp_path):
    """Costs are recorded with 6 digits and shown with 4: the total is not rounded to 3 first."""
    work = str(tmp_path / "work")
    storage.write_manifest(storage.join(work, "a"), {"stage": "train", "cost": _cost(1.0, 1.0, 0.0004)})
    storage.write_manifest(storage.join(work, "b"), {"stage": "train", "cost": _cost(1.0, 1.0, 0.0003)})
    result = report(ReportConfig(workdir=work))
    assert result.totals["estimated_cost"] == 0.0007
    assert next(line for line in result.table.splitlines() if line.startswith("| **total**")).endswith("| 0.0007 |")


def test_a_manifest_json_that_is_no_stage_manifest_is_left_out_by_name(tmp_path, caplog):
    work = str(tmp_path / "work")
    storage.write_manifest(storage.join(work, "real"), {"stage": "ingest", "cost": _cost(1.0, 1.0, 0.0)})
    storage.write_bytes(storage.join(work, "notes", "manifest.json"), b"[1, 2]")
    storage.write_bytes(storage.join(work, "broken", "manifest.json"), b"{not json")
    result = report(ReportConfig(workdir=work + "//"))  # extra slashes do not cut the output names
    assert [r["output"] for r in result.rows] == ["real"]
    assert "leaves out" in caplog.text and "notes/manifest.json: not a stage manifest (a JSON list)" in caplog.text
    assert "broken/manifest.json: not a stage manifest" in caplog.text
