"""What manifests record about the software and the cost of a stage."""

from __future__ import annotations

from ray_dafusion.runinfo import CostMeter, max_rss_bytes, rss_bytes, versions


def test_versions_name_every_package_that_shapes_an_output():
    recorded = versions()
    for name in ("ray", "torch", "diffusers", "pyarrow", "numpy", "pillow", "safetensors", "scikit-learn"):
        assert name in recorded and recorded[name] != "not installed", name


def test_a_stage_does_not_report_an_earlier_stages_peak_memory():
    """A pipeline runs every stage in one driver: the process's lifetime peak is not this stage's."""
    big = bytearray(600 * 2**20)
    big[::4096] = b"\x01" * len(big[::4096])  # touch every page: resident
    peak = max_rss_bytes()
    del big
    meter = CostMeter()
    reported = meter.report()["peak_memory_bytes"]
    assert 0 < reported < peak - 400 * 2**20
    meter.add_actor_seconds(1.0, 1.0, peak_memory=peak)  # a worker's peak still counts
    assert meter.report()["peak_memory_bytes"] == peak
    # a stage that raises the driver's peak itself reports that peak
    meter = CostMeter()
    more = bytearray(max_rss_bytes() - rss_bytes() + 300 * 2**20)
    more[::4096] = b"\x01" * len(more[::4096])
    del more
    assert meter.report()["peak_memory_bytes"] >= max_rss_bytes() > peak
