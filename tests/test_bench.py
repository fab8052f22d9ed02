"""`mquant bench latency` on the ci-small preset: the contract of its outputs (not the timings)."""

import json

import pytest

from mquant.cli import main


def test_latency_ci_small_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--preset", "ci-small", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "ci-small" and result["device"] and result["backend"] == "cpu-int8"
    variants = ["fp32", "bf16", "w4a8-dynamic", "w4a8-static", "w4a8-msq", "w4a8-msq-aifs"]
    assert list(result["times_ms"]) == variants
    for times in result["times_ms"].values():
        assert set(times) == {"linears", "hadamard", "lm_prefill", "vision_prefill", "decode"}
        assert all(t >= 0 for t in times.values())
    for key in ("static_aifs_vs_dynamic", "static_aifs_vs_bf16", "static_aifs_vs_msq_no_aifs", "act_quant_overhead"):
        assert isinstance(result["ratios"][key], float)
    assert result["gemm_only_ms"] > 0 and result["gemm_isolated_ms"] > 0
    assert out.with_suffix(".md").read_text().startswith("Latency, preset `ci-small`")
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [(["--preset", "qwen2-vl-72b"], "unknown preset"),
                                           (["--preset", "ci-small", "--variants", "fp16"], "unknown variants")])
def test_latency_rejects_bad_arguments(tmp_path, capsys, args, message):
    assert main(["bench", "latency", *args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
