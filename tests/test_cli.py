"""The command line as users run it: subprocesses, exit codes, one-line errors, files written."""

import json
import subprocess
import sys

import pytest


def mquant(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "mquant", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"mquant {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "it/s]" not in l]
    assert len(lines) == 1 and lines[0].startswith("mquant: error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_tiny_quantize_eval(arch, tmp_path):
    tiny, quant, result = tmp_path / "t", tmp_path / "q", tmp_path / "eval.json"
    mquant("tiny", arch, "--out", tiny, "--seed", 3)
    out = mquant("quantize", tiny, "--recipe", "gptq-w4a8", "--out", quant, "--num-calib", 4).stdout
    assert "language" in out and "W4A8" in out
    for name in ("model.safetensors", "recipe.yaml", "quant_report.json", "mquant_checkpoint.json", "config.json"):
        assert (quant / name).is_file()
    report = json.loads((quant / "quant_report.json").read_text())
    assert {l["part"] for l in report["layers"]} == {"vision", "projector", "language"}
    assert all(l["w_bits"] == 4 and l["a_bits"] == 8 and l["a_scales"]["visual"] > 0 for l in report["layers"])
    mquant("eval", quant, "--tasks", "digits,yesno", "--limit", 3, "--out", result)
    data = json.loads(result.read_text())
    assert data["recipe"] == "gptq-w4a8" and data["tasks"]["digits"]["n"] == 3 and data["tasks"]["yesno"]["n"] == 3
    assert 0 <= data["average"] <= 1


def test_errors_are_one_line(tmp_path):
    assert_one_line_error(mquant("quantize", tmp_path, "--recipe", "gptq-w4a8", "--out", tmp_path / "o",
                                 check=False), "no config.json")
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert_one_line_error(mquant("quantize", tmp_path, "--recipe", "gptq-w4a8", "--out", tmp_path / "o",
                                 check=False), "supported families")
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision:\n  weights:\n    bits: 4\n")
    assert_one_line_error(mquant("quantize", tmp_path, "--recipe", bad, "--out", tmp_path / "o", check=False),
                          "unknown key 'vision.weights.bits'")
    assert_one_line_error(mquant("eval", tmp_path, "--tasks", "nope", "--out", tmp_path / "e.json",
                                 check=False), "supported families")
    assert not (tmp_path / "o").exists()


def test_help_and_recipes():
    for cmd in ([], ["tiny"], ["quantize"], ["eval"], ["verify"], ["recipes"]):
        assert mquant(*cmd, "--help").returncode == 0
    listing = mquant("recipes").stdout
    assert "gptq-w4a8-dynamic" in listing and "smoothquant-w4a8" in listing
    assert "num_bits: 4" in mquant("recipes", "gptq-w4a8").stdout


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "embedded"])
def test_verify_reports_every_transform_step(arch, model_dirs, tmp_path):
    out = tmp_path / "verify.json"
    # The embedded model gets the benchmark's prompts: one of each task, so single images, the
    # interleaved two-image `compare` and, in the batched generation, left padding.
    samples = ("--samples", "builtin", "--num-samples", 6) if arch == "embedded" else ("--num-samples", 3)
    proc = mquant("verify", model_dirs[arch], "--transforms", "ln2rn,rotate,online_hadamard,rms,aifs", "--out", out,
                  *samples)
    data = json.loads(out.read_text())
    assert data["transforms"] == ["ln2rn", "rotate", "online_hadamard", "rms", "aifs"]
    assert [s["transform"] for s in data["steps"]] == data["transforms"]
    assert data["max_rel_logit_diff"] <= 1e-4 and data["generation_identical"] and data["preserved"]
    assert any(d["split"] for d in data["details"]["rms"].values())  # the vision fc2 layers at least
    assert "function preserved" in proc.stdout


def test_verify_rejects_unknown_transforms(tiny_dirs, tmp_path):
    args = ("verify", tiny_dirs["qwen2_vl"], "--out", tmp_path / "v.json")
    assert_one_line_error(mquant(*args, "--transforms", "rotate,spin", check=False), "unknown transform 'spin'")
    assert_one_line_error(mquant(*args, "--transforms", "rms", check=False), "needs online_hadamard")
    assert not (tmp_path / "v.json").exists()


def test_generate_answers_an_interleaved_prompt_on_each_backend(tmp_path):
    from mquant.zoo import EMBEDDED_MODEL, benchmark

    sample = benchmark.generate("compare", "test", 1)[0]
    paths = []
    for i, image in enumerate(sample.images):
        image.save(tmp_path / f"{i}.png")
        paths += ["--image", tmp_path / f"{i}.png"]
    fp = mquant("generate", EMBEDDED_MODEL, *paths, "--prompt", sample.text, "--max-new-tokens", 4).stdout.strip()
    assert fp == sample.answers[0]
    quant = tmp_path / "q"
    mquant("quantize", EMBEDDED_MODEL, "--recipe", "mquant-w4a8", "--calib", "synthetic", "--num-calib", 4,
           "--out", quant)
    answers = {backend: mquant("generate", quant, *paths, "--prompt", sample.text, "--backend", backend,
                               "--max-new-tokens", 4).stdout.strip() for backend in ("fake", "cpu-int8")}
    assert answers["fake"] and answers["cpu-int8"] == answers["fake"]


def test_generate_errors_are_one_line(tmp_path, tiny_dirs):
    from PIL import Image

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    model = tiny_dirs["qwen2_vl"]
    assert_one_line_error(mquant("generate", model, "--image", tmp_path / "missing.png", "--prompt", "hi",
                                 check=False), "cannot read image")
    assert_one_line_error(mquant("generate", model, "--image", tmp_path / "a.png", "--prompt", "<image> <image> x",
                                 check=False), "2 <image> markers but 1")
    assert_one_line_error(mquant("generate", model, "--prompt", "hi", "--backend", "cpu-int8", check=False),
                          "not a quantized checkpoint")
