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


def test_peers_write_json_table_and_plot_with_the_kernels_that_ran(tmp_path, monkeypatch):
    """`mquant bench peers` on the embedded model's stack at decode size: one row per path that ran,
    ratios over bf16, the kernel of every mquant linear; a peer that cannot run is skipped with why."""
    from mquant.bench import peers
    from mquant.runtime.cpu_kernels import KERNELS

    real_runner = peers.path_runner

    def runner(path, layers):
        if path == "openvino-int8":
            raise ImportError("No module named 'openvino'")
        return real_runner(path, layers)

    monkeypatch.setattr(peers, "path_runner", runner)
    out = tmp_path / "peers.json"
    args = ["--stacks", "embedded", "--rows", "decode-1", "--paths", "fp32,bf16,mquant-static,openvino-int8"]
    assert main(["bench", "peers", *args, "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert list(row["ms"]) == ["fp32", "bf16", "mquant-static"] and row["vs_bf16"]["bf16"] == 1.0
    assert set(row["kernels"]["mquant-static"]) <= set(KERNELS)
    assert result["skipped"] == {"openvino-int8": "ImportError: No module named 'openvino'"}
    assert "| embedded | decode-1 (M=1) |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [(["--stacks", "llama-405b"], "--stacks: unknown llama-405b"),
                                           (["--rows", "prefill,decode-3"], "--rows: unknown decode-3"),
                                           (["--repeats", "0"], "--repeats must be at least 1")])
def test_peers_reject_bad_arguments(tmp_path, capsys, args, message):
    assert main(["bench", "peers", *args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
