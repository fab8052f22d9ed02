"""`mquant demo` on the embedded model (a small subset, so the test stays fast)."""

import json

import pytest
from PIL import Image

from mquant.demo import run_demo
from mquant.zoo import EMBEDDED_MODEL

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").is_file(), reason="embedded model not trained")


def test_demo_writes_results_report_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr("mquant.demo.FAST_LIMIT", 4)
    results = run_demo(tmp_path, fast=True, recipes=["gptq-w4a8", "gptq-w4a8-dynamic"], num_calib=4,
                       progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["recipe"] for r in data["rows"]] == ["fp32", "gptq-w4a8", "gptq-w4a8-dynamic"]
    assert data["fp_average"] == data["rows"][0]["average"]
    for row in data["rows"]:
        assert set(row["tasks"]) == set(data["tasks"]) and 0 <= row["average"] <= 1 and row["size_mb"] > 0
    assert data["rows"][1]["size_mb"] < 0.3 * data["rows"][0]["size_mb"]
    report = (tmp_path / "report.md").read_text()
    assert "| gptq-w4a8 |" in report and "plot.png" in report
    assert "activation statistics" in report and data["ablation"] is None  # ablation needs its recipes
    diagnostics = json.loads((tmp_path / "diagnostics.json").read_text())
    language = [v for v in diagnostics["before_rotation"].values() if v["part"] == "language"]
    assert language and all(v["visual_absmax"] > 0 and v["text_absmax"] > 0 for v in language)
    with Image.open(tmp_path / "plot.png") as im:
        assert im.width > 500 and im.height > 200
    assert "gptq-w4a8-dynamic" in results["table"]
