"""`mquant demo` on both models (tiny subsets, so the tests stay fast)."""

import dataclasses
import json

import pytest
from PIL import Image

from mquant.demo import MODELS, interval_95, recipe_names, run_demo
from mquant.errors import MquantError
from mquant.zoo import EMBEDDED_MODEL


@pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").is_file(), reason="embedded model not trained")
def test_demo_writes_results_report_and_plot(tmp_path):
    results = run_demo(tmp_path, "fast", models=["embedded"], recipes=["gptq-w4a8", "gptq-w4a8-dynamic"],
                       num_calib=4, limit=4, progress=False)
    data = json.loads((tmp_path / "embedded" / "results.json").read_text())
    assert [r["recipe"] for r in data["rows"]] == ["fp32", "gptq-w4a8", "gptq-w4a8-dynamic"]
    assert data["fp_average"] == data["rows"][0]["average"]
    for row in data["rows"]:
        assert set(row["tasks"]) == set(data["tasks"]) and 0 <= row["average"] <= 1 and row["size_mb"] > 0
    assert data["rows"][1]["size_mb"] < 0.3 * data["rows"][0]["size_mb"]
    report = (tmp_path / "embedded" / "report.md").read_text()
    assert "| gptq-w4a8 |" in report and "plot.png" in report and "95 % interval" in report
    assert "activation statistics" in report and data["ablation"] is None  # ablation needs its recipes
    assert (tmp_path / "report.md").read_text() == report
    diagnostics = json.loads((tmp_path / "embedded" / "diagnostics.json").read_text())
    language = [v for v in diagnostics["before_rotation"].values() if v["part"] == "language"]
    assert language and all(v["visual_absmax"] > 0 and v["text_absmax"] > 0 for v in language)
    assert len(diagnostics["residual_before_rotation"]) == len(diagnostics["residual_after_rotation"]) > 0
    with Image.open(tmp_path / "embedded" / "plot.png") as im:
        assert im.width > 500 and im.height > 200
    assert "gptq-w4a8-dynamic" in results["results"]["embedded"]["table"]


def test_demo_on_a_llava_with_the_real_models_tasks(tmp_path, tiny_dirs, monkeypatch):
    """The real-weights model's path through the demo (its own tasks and calibration, no integer
    backend), on a tiny DINOv2 + Qwen2 LLaVA standing in for it."""
    tiny = dataclasses.replace(MODELS["real"], locate=lambda progress: tiny_dirs["llava-dinov2"])
    monkeypatch.setitem(MODELS, "real", tiny)
    results = run_demo(tmp_path, "fast", models=["real"], recipes=["rtn-w4a8", "quarot-w4a8"], num_calib=2,
                       limit=2, progress=False)["results"]["real"]
    assert results["tasks"] == list(tiny.tasks) and results["calib"] == tiny.calib
    assert [r["recipe"] for r in results["rows"]] == ["fp32", "rtn-w4a8", "quarot-w4a8"]
    assert all(r["prefill_ms"] is None for r in results["rows"][1:])
    assert "| layer | residual max/median |" in results["report"]


def test_demo_modes_and_bad_names():
    assert recipe_names("full")[-1] == "mquant-w4a8-no-rms"  # the ablation's extra recipe
    assert recipe_names("default").count("mquant-w4a8-no-rms") == 1
    assert "mquant-w4a8-no-rms" not in recipe_names("fast", ["gptq-w4a8"])
    for kwargs in ({"mode": "slow"}, {"models": ["other"]}, {"recipes": ["no-such-recipe"]}):
        with pytest.raises(MquantError):
            run_demo("unused", **{"mode": "fast", **kwargs}, progress=False)


def test_interval_95_matches_the_normal_approximation():
    result = {"tasks": {"a": {"score": 0.5}, "b": {"score": 0.9}}}
    ci = interval_95(result, {"a": 100, "b": 100})
    assert ci["tasks"] == {"a": 9.8, "b": 5.9}  # 1.96 * sqrt(p (1 - p) / n), in points
    assert ci["average"] == round((9.8 ** 2 + 5.88 ** 2) ** 0.5 / 2, 1)


def test_an_interrupted_demo_resumes_where_it_stopped(tmp_path, tiny_dirs, monkeypatch):
    """Each recipe's rows are saved as they are scored; `resume` reuses those made with the same
    settings (and only those), and the report says which."""
    import mquant.demo as demo

    tiny = dataclasses.replace(MODELS["real"], locate=lambda progress: tiny_dirs["llava-dinov2"])
    monkeypatch.setitem(MODELS, "real", tiny)
    args = dict(models=["real"], recipes=["rtn-w4a8", "quarot-w4a8"], num_calib=2, limit=2, progress=False)
    first = run_demo(tmp_path, "fast", **args)["results"]["real"]
    calls = []
    original = demo._recipe_rows
    monkeypatch.setattr(demo, "_recipe_rows", lambda model, path, out, recipe, *a: calls.append(recipe.name) or
                        original(model, path, out, recipe, *a))
    (tmp_path / "real" / "rows" / "quarot-w4a8.json").unlink()  # as if interrupted during quarot-w4a8
    again = run_demo(tmp_path, "fast", resume=True, **args)["results"]["real"]
    assert calls == ["quarot-w4a8"] and again["resumed"] == ["fp32", "rtn-w4a8"]
    assert [r["average"] for r in again["rows"]] == [r["average"] for r in first["rows"]]
    assert "--resume: the rows of fp32, rtn-w4a8 were reused" in again["report"]
    calls.clear()
    run_demo(tmp_path, "fast", resume=True, **{**args, "limit": 1})  # other settings: nothing reused
    assert calls == ["rtn-w4a8", "quarot-w4a8"]
