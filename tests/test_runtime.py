"""The integer backends against the fake-quant reference (ALGORITHMS.md §14)."""

import pytest
import torch

import mquant
from mquant.errors import MquantError
from mquant.models.vlm import load_pretrained
from mquant.pipeline.calib import synthetic_samples
from mquant.runtime import int8_ops
from mquant.runtime import compiling, cpu_kernels, native
from mquant.runtime.int8_ops import Int8Gemm
from mquant.runtime.int_linear import int_linears
from mquant.runtime.backends import triton_unavailable_reason

KERNELS = [name for name, kernel in cpu_kernels.KERNELS.items() if kernel.available()]


def _codes(shape, lo, hi, seed):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def _reference(q, w, w_scale, row_scale, bias):
    acc = q.double() @ w.double().T  # exact: |acc| < 2^53
    return acc * row_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1) + bias.double()


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_gemm_accumulates_exactly(kernel):
    q, w = _codes((23, 96), -128, 127, 0), _codes((48, 96), -8, 7, 1)
    gemm = Int8Gemm(w, torch.ones(48, 1), None, None, kernel=kernel)
    y = gemm.scalar(q, 1.0, torch.float32)
    assert torch.equal(y.double(), q.double() @ w.double().T)  # integers below 2^24: exact in float32


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_gemm_scale_layouts_match_the_formula(kernel):
    rows = 30
    q, w = _codes((rows, 64), -128, 127, 2), _codes((32, 64), -8, 7, 3)
    w_scale, bias = torch.rand(32, 1) + 0.1, torch.randn(32)
    gemm = Int8Gemm(w, w_scale, None, bias, kernel=kernel)
    inner, outer, start, stop = 0.02, 0.005, 4, 21
    blocks = torch.where((torch.arange(rows) >= start) & (torch.arange(rows) < stop), inner, outer)
    per_row = torch.rand(rows, 1) / 50
    cases = [(gemm.scalar(q, outer, torch.float32), torch.full((rows,), outer)),
             (gemm.two_blocks(q, inner, outer, start, stop, torch.float32), blocks),
             (gemm.two_blocks(q, inner, outer, 0, 3, torch.float32),  # the text block is the majority
              torch.where(torch.arange(rows) < 3, inner, outer)),
             (gemm.rows(q, per_row, torch.float32), per_row)]
    for y, row_scale in cases:
        torch.testing.assert_close(y.double(), _reference(q, w, w_scale, row_scale, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("rows,k,n", [(1, 7, 13), (17, 33, 5), (5, 200, 9), (3, 96, 48), (16, 48, 40), (13, 200, 64),
                                      (9, 36, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_is_exact_on_ragged_shapes_in_either_code_encoding(kernel, unsigned, rows, k, n, dtype):
    if not cpu_kernels.KERNELS[kernel].fits(k, n, True):
        pytest.skip(f"{kernel} does not take {n} x {k} weights")
    q, w = _codes((rows, k), -128, 127, rows), _codes((n, k), -8, 7, k)
    gemm = Int8Gemm(w, torch.ones(n, 1), None, None, kernel=kernel)
    y = gemm.scalar(cpu_kernels.encode(q, unsigned), 1.0, dtype)
    exact = q.double() @ w.double().T
    if dtype == torch.float32:
        assert torch.equal(y.double(), exact)  # |acc| < 2^24: exact in float32
    else:  # the accumulator is exact; the bf16 output rounds it
        assert y.dtype == dtype and torch.equal(y.double(), exact.to(dtype).double()) or \
            torch.allclose(y.double(), exact, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("compile_", [False, True])
def test_unsigned_codes_are_the_signed_ones_plus_128(compile_):
    x = torch.cat([torch.randn(2000, 24) * 9, (torch.arange(24) - 12).float().reshape(1, -1) * 0.05])  # ties at .5
    scale = torch.tensor(0.1)
    fn = int8_ops.compiled(int8_ops.quantize_static) if compile_ else int8_ops.quantize_static
    signed, unsigned = fn(x, scale, -128, 127), fn(x, scale, -128, 127, True)
    assert unsigned.dtype == torch.uint8 and torch.equal(unsigned.int() - 128, signed.int())
    q, s = int8_ops.quantize_dynamic(x, 127, True)
    assert torch.equal(q.int() - 128, int8_ops.quantize_dynamic(x, 127)[0].int())


needs_native = pytest.mark.skipif(not native.available(), reason="no AVX-512 VNNI (or no C compiler) here")


@needs_native
@pytest.mark.parametrize("four_bit", [True, False])
def test_native_products_are_exact_at_the_extremes_of_both_grids(four_bit):
    """Full-range codes (u8 0 and 255, weights -8/7 or -128/127) at a width where a saturating or
    16-bit accumulation would show: the int32 accumulator is the integer product exactly."""
    lo, hi = (-8, 7) if four_bit else (-128, 127)
    w = _codes((32, 4096), lo, hi, 7)
    w[0], w[1] = lo, hi
    q = _codes((6, 4096), -128, 127, 8)
    q[0], q[1] = -128, 127
    acc = native.PackedWeight(w, torch.ones(32), four_bit)(cpu_kernels.encode(q, True), 1.0, None, torch.float32)
    exact = q.double() @ w.double().T
    assert exact.abs().max() > 2 ** 20 and torch.equal(acc.double(), exact)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unsigned", [False, True])
def test_native_quantizers_give_the_reference_codes(dtype, unsigned):
    """Static, two-block, per-row and dynamic codes equal the PyTorch quantizers' (ties at .5 included)
    on ragged widths and on rows that are a view into a wider tensor."""
    g = torch.Generator().manual_seed(0)
    for width in (7, 16, 200):
        x = (torch.randn(11, width + 3, generator=g) * 4).to(dtype)
        x[0, :4] = torch.tensor([0.05, 0.15, -0.25, 0.35])  # exactly between two codes at scale 0.1
        x = x[:, :width]  # rows `width + 3` apart
        s, inner, rows = torch.tensor(0.1), torch.tensor(0.37), torch.rand(11, 1, generator=g) + 0.05
        assert torch.equal(int8_ops.static_codes(x, 0.1, s, -128, 127, unsigned),
                           int8_ops.quantize_static(x, s, -128, 127, unsigned))
        assert torch.equal(int8_ops.two_block_codes(x, 0.37, 0.1, inner, s, 2, 9, -8, 7, unsigned),
                           int8_ops.quantize_two_blocks(x, inner, s, 2, 9, -8, 7, unsigned))
        assert torch.equal(int8_ops.row_codes(x, rows, -128, 127, unsigned),
                           int8_ops.quantize_static(x, rows, -128, 127, unsigned))
        (q, scale), (ref_q, ref_scale) = int8_ops.dynamic_codes(x, 127, unsigned), int8_ops.quantize_dynamic(x, 127, unsigned)
        assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


def test_native_kernels_step_aside_when_turned_off_or_unbuildable(monkeypatch, tmp_path):
    monkeypatch.setenv("MQUANT_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        monkeypatch.setenv("MQUANT_NATIVE", "0")
        assert native.library() is None and not native.takes(torch.zeros(2, 8))
        native.library.cache_clear()
        monkeypatch.setenv("MQUANT_NATIVE", "1")
        monkeypatch.setenv("CC", "false")  # a compiler that fails
        if native.cpu_features().avx512_vnni:
            with pytest.warns(UserWarning, match="native VNNI kernels are unavailable"):
                assert native.library() is None
            assert not list(tmp_path.glob("native/*.so"))  # nothing half-built is left to be loaded
    finally:
        native.library.cache_clear()


def test_kernel_choices_are_remade_when_the_candidates_change(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_time_candidate", lambda kernel, *args, **kw: 1.0)
    table = cpu_kernels.KernelTable(tmp_path / "table.json")
    table.choose(64, 64, 32, torch.bfloat16)
    assert cpu_kernels.KernelTable(table.path).choices  # the same candidates: the choices are kept
    fewer = cpu_kernels.KernelTable(table.path)
    fewer.candidates = fewer.candidates[:-1]  # e.g. the native kernels turned off
    assert fewer._read() == {}


def test_kernel_choices_are_measured_once_per_machine_and_kept_on_disk(tmp_path, monkeypatch):
    cost = {"onednn-u8": 1.0, "onednn-s8": 500.0, "int_mm": 2.0, "float": 1.5, "float32": 2.5, "int8pack": 3.0,
            "int4pack": 4.0, "vnni-w4": 1.2, "vnni-w8": 1.3}
    calls = []

    def fake_time(kernel, rows, k, n, dtype, budget, give_up=float("inf")):
        calls.append((kernel.name, rows, k, n))
        return cost[kernel.name] * (0.1 if (kernel.name == "float" and rows == 1) else 1.0)

    monkeypatch.setattr(cpu_kernels, "_time_candidate", fake_time)  # onednn-s8: the reference path
    path = tmp_path / "table.json"
    table = cpu_kernels.KernelTable(path)
    assert table.choose(100, 64, 32, torch.bfloat16) == "onednn-u8"
    # Rows are timed at their bucket's size; the path orders of magnitude off on the screening
    # problem is never timed at a real shape.
    assert ("onednn-u8", 128, 64, 32) in calls and ("onednn-s8", 128, 64, 32) not in calls
    with pytest.warns(UserWarning, match="no integer kernel beats bfloat16"):
        assert table.choose(1, 64, 32, torch.bfloat16) == "float"
    timed = table.timed
    assert table.choose(90, 64, 32, torch.bfloat16) == "onednn-u8" and table.timed == timed  # same bucket
    again = cpu_kernels.KernelTable(path)  # a later process on the same machine
    assert again.choose(100, 64, 32, torch.bfloat16) == "onednn-u8" and again.choose(1, 64, 32, torch.bfloat16) == "float"
    assert again.timed == 0


def test_a_loaded_model_times_nothing_the_second_time(tiny_dirs, tmp_path_factory, tmp_path, monkeypatch):
    path = _quantized_dir(tiny_dirs, "llava", "mquant-w4a8", tmp_path_factory)
    sample = synthetic_samples(2, 5)[1]
    monkeypatch.setattr(cpu_kernels, "kernel_table", lambda: table)
    table = cpu_kernels.KernelTable(tmp_path / "table.json")
    first = mquant.load(path, backend="cpu-int8").logits(sample)
    assert table.timed > 0
    table = cpu_kernels.KernelTable(tmp_path / "table.json")
    second = mquant.load(path, backend="cpu-int8").logits(sample)
    assert table.timed == 0 and torch.equal(first, second)


def test_the_float_fallback_gives_the_fake_quant_generations(tiny_dirs, tmp_path_factory):
    path = _quantized_dir(tiny_dirs, "qwen2_vl", "mquant-w4a8", tmp_path_factory)
    fake, fallback = mquant.load(path), mquant.load(path, backend="cpu-int8", dtype=torch.float32, kernel="float")
    for sample in synthetic_samples(3, 11):
        ref, out = fake.logits(sample), fallback.logits(sample)
        assert (out - ref).abs().max() <= 3e-3 * ref.abs().max()
        assert fake.generate([sample], 5) == fallback.generate([sample], 5)


def test_group_scales_accumulate_per_group():
    q, w = _codes((9, 70), -128, 127, 4), _codes((12, 70), -8, 7, 5)
    scales = torch.rand(12, 3) + 0.1  # groups of 32: 32 + 32 + 6 columns
    y = Int8Gemm(w, scales, 32, None).scalar(q, 0.5, torch.float32)
    expected = sum((q[:, g:g + 32].double() @ w[:, g:g + 32].double().T) * scales[:, i].double()
                   for i, g in enumerate(range(0, 70, 32))) * 0.5
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)


# On CUDA the compiled quantizers are Inductor-generated Triton code, whose float division need not
# round like eager torch's: a code off by one there moves the integer path off the fake-quant one.
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compiled_quantizers_give_the_reference_codes(device):
    from mquant.numerics.args import QuantArgs
    from mquant.numerics.grid import quantize

    scale = torch.tensor(0.1, device=device)
    x = torch.cat([torch.randn(4000, 33) * 5, (torch.arange(33) - 16).float().reshape(1, -1) * 0.05])  # ties at .5
    x = x.to(device)
    expected = quantize(x, scale, None, QuantArgs()).to(torch.int8)
    compiled = int8_ops.compiled(int8_ops.quantize_static)
    assert torch.equal(compiled(x, scale, -128, 127), expected)
    assert torch.equal(int8_ops.quantize_static(x, scale, -128, 127), expected)
    q, s = int8_ops.compiled(int8_ops.quantize_dynamic)(x, 127)
    assert torch.equal(q, quantize(x, s, None, QuantArgs()).to(torch.int8))


def _quantized_dir(tiny_dirs, family, recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{family}-{recipe}")
    vlm = mquant.quantize(load_pretrained(tiny_dirs[family]), recipe, "synthetic", num_samples=8, progress=False)
    mquant.save(vlm, out)
    return out


@pytest.mark.parametrize("recipe", ["mquant-w4a8", "quarot-w4a8-dynamic", "gptq-w4a16", "mquant-w8a8"])
def test_cpu_int8_backend_matches_fake_quant(tiny_dirs, family, recipe, tmp_path_factory):
    path = _quantized_dir(tiny_dirs, family, recipe, tmp_path_factory)
    fake, fast = mquant.load(path), mquant.load(path, backend="cpu-int8", dtype=torch.float32)
    layers = int_linears(fast.model)
    assert layers, "no layer was converted"
    for sample in synthetic_samples(3, 11):
        ref, out = fake.logits(sample), fast.logits(sample)
        # Integer products are exact; float rounding in the epilogues may move a later layer's
        # input across a rounding boundary (one code step), hence a tolerance, not equality: up to
        # 2.3e-3 of the largest logit seen (qwen2_vl, quarot-w4a8-dynamic), most logits within 1e-7.
        diff = (out - ref).abs()
        assert diff.max() <= 3e-3 * ref.abs().max()
        assert diff.median() <= 1e-3 * ref.abs().max()
        assert fake.generate([sample], 5) == fast.generate([sample], 5)
    assert all(m.calls > 0 for _, m in layers)


def test_msq_layers_use_the_block_layout_with_aifs_and_row_lookup_without(tiny_dirs, tmp_path_factory):
    from mquant.modality.aifs import disable_aifs
    from mquant.samples import IMAGE_MARKER, Sample

    path = _quantized_dir(tiny_dirs, "qwen2_vl", "mquant-w4a8", tmp_path_factory)
    vlm = mquant.load(path, backend="cpu-int8", dtype=torch.float32)
    one, other = [s for s in synthetic_samples(6, 3) if s.images][:2]
    two = Sample("two", [one.images[0], other.images[0]], f"First: {IMAGE_MARKER} then {IMAGE_MARKER}\nSame?", ["no"])
    msq = [m for _, m in int_linears(vlm.model) if m.per_modality]
    assert msq
    aifs_logits = vlm.logits(two)  # interleaved images: AIFS reorders them into one block
    assert {m.last_layout for m in msq} == {"block"}
    disable_aifs(vlm.model, vlm.family.language_model)
    vlm.logits(one)  # a single image's tokens are one block already, with or without AIFS
    assert {m.last_layout for m in msq} == {"block"}
    plain_logits = vlm.logits(two)
    assert {m.last_layout for m in msq} == {"rows"}
    # The same function, rows in another order: float rounding in the epilogues and attention may move
    # a later layer's input across a rounding boundary (one code step; 1.4e-4 of the largest logit
    # measured on this checkpoint), so the bound is the one step's, and almost every logit is equal.
    diff = (aifs_logits - plain_logits).abs()
    assert diff.max() <= 1e-3 * plain_logits.abs().max(), diff.max()
    assert diff.median() <= 1e-6 * plain_logits.abs().max(), diff.median()


def test_bfloat16_backend_stays_close(tiny_dirs, tmp_path_factory):
    path = _quantized_dir(tiny_dirs, "qwen2_vl", "mquant-w4a8", tmp_path_factory)
    ref = mquant.load(path).logits(synthetic_samples(2, 5)[1])
    out = mquant.load(path, backend="cpu-int8").logits(synthetic_samples(2, 5)[1])
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_backend_errors(tiny_dirs, tmp_path_factory):
    with pytest.raises(MquantError, match="unknown backend"):
        mquant.load(tiny_dirs["llava"], backend="int3")
    with pytest.raises(MquantError, match="not a quantized checkpoint"):
        mquant.load(tiny_dirs["llava"], backend="cpu-int8")


# -- Triton: on the GPU when there is one, otherwise in Triton's interpreter (set by conftest) ----
TRITON_SKIP = triton_unavailable_reason()


@pytest.fixture
def triton_device():
    if TRITON_SKIP:
        pytest.skip(TRITON_SKIP)
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_w4a8_kernel_matches_the_integer_reference(triton_device):
    import mquant.runtime.triton_w4a8 as kernels

    rows, k, n = 37, 91, 50  # odd sizes: masked tails in every dimension, K padded in the packing
    q, w = _codes((rows, k), -128, 127, 6).to(triton_device), _codes((n, k), -8, 7, 7).to(triton_device)
    w_scale, bias = (torch.rand(n, 1) + 0.1).to(triton_device), torch.randn(n).to(triton_device)
    gemm = kernels.TritonW4A8Gemm(w, w_scale, None, bias)
    blocks = torch.where((torch.arange(rows) >= 5) & (torch.arange(rows) < 30), 0.02, 0.005).to(triton_device)
    per_row = (torch.rand(rows, 1) / 50).to(triton_device)
    for y, row_scale in [(gemm.scalar(q, 0.01, torch.float32), torch.full((rows,), 0.01)),
                         (gemm.two_blocks(q, 0.02, 0.005, 5, 30, torch.float32), blocks),
                         (gemm.rows(q, per_row, torch.float32), per_row)]:
        torch.testing.assert_close(y.double().cpu(), _reference(q.cpu(), w.cpu(), w_scale.cpu(), row_scale.cpu(),
                                                                bias.cpu()), rtol=1e-5, atol=1e-4)
    exact = kernels.TritonW4A8Gemm(w, torch.ones(n, 1, device=triton_device), None, None).scalar(q, 1.0, torch.float32)
    assert torch.equal(exact.double().cpu(), q.cpu().double() @ w.cpu().double().T)


def test_triton_backend_runs_a_model(tiny_dirs, tmp_path_factory, triton_device):
    path = _quantized_dir(tiny_dirs, "qwen2_vl", "mquant-w4a8", tmp_path_factory)
    sample = synthetic_samples(2, 5)[1]
    # The reference runs on the same device, so that only the integer path differs (GPU float
    # attention and norms round differently from the CPU's).
    ref = mquant.load(path, device=triton_device).logits(sample).cpu()
    out = mquant.load(path, backend="triton", dtype=torch.float32, device=triton_device).logits(sample).cpu()
    assert (out - ref).abs().max() <= 2e-3 * ref.abs().max()  # as for cpu-int8: one code step may move


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken(fn, dynamic):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)

    def square(x):
        return x * x

    # functools.cache keeps the undecorated function as __wrapped__: no cached instance is touched
    wrapped = compiling.compiled.__wrapped__(square)
    big = torch.full((compiling.EAGER_BELOW,), 3.0)  # small inputs run eagerly anyway
    with pytest.warns(UserWarning, match="running it eagerly"):
        assert torch.equal(wrapped(big), big * big)
    assert torch.equal(wrapped(big - 1), (big - 1) ** 2)


def test_bf16_evaluation_quantizes_activations_in_fp32():
    """Under `--precision bf16` a bf16 product's output reaches the next quantizer: it is rounded on
    the grid in fp32 (as calibrated), then multiplied in bf16 with fp32 accumulation."""
    from mquant.algorithms.rtn import rtn_quantize
    from mquant.eval.runner import matmul_precision
    from mquant.numerics.args import QuantArgs
    from mquant.numerics.grid import fake_quantize
    from mquant.runtime.qlinear import QuantLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    w_args = QuantArgs(num_bits=4, strategy="channel", symmetric=True)
    a_args = QuantArgs(num_bits=8, strategy="tensor", symmetric=True)
    scale = torch.tensor([0.013])
    q = QuantLinear.from_float(linear, rtn_quantize(linear.weight, w_args), a_args, (scale, None))
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert torch.equal(q.quantize_input(x), fake_quantize(x.float(), scale, None, a_args))
    holder = type("V", (), {"model": q})()
    with matmul_precision(holder, "bf16"):
        y = q(x)
    expected = torch.nn.functional.linear(fake_quantize(x.float(), scale, None, a_args).bfloat16(),
                                          q.dequantized_weight().bfloat16(), q.bias.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    with pytest.raises(MquantError, match="unknown precision"):
        matmul_precision(holder, "fp8")


# -- activation quantization fused into the norms --------------------------------------------------
def _norms_of_every_kind():
    from mquant.transforms.ln2rn import CenteringNorm, MaskedRMSNorm, WeightlessRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rms = LlamaRMSNorm(8, eps=0.0)
    rms.weight.data = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 4.0, 1.0, 0.25])
    layer = torch.nn.LayerNorm(8, eps=0.0)
    layer.weight.data, layer.bias.data = torch.full((8,), 2.0), torch.full((8,), 0.25)
    return {"rms": rms, "weightless": WeightlessRMSNorm(0.0), "masked": MaskedRMSNorm(0.0),
            "centering": CenteringNorm(0.0), "layer": layer}


@pytest.mark.parametrize("kind", ["rms", "weightless", "masked", "centering", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_gives_the_separate_quantizers_codes_ties_included(kind, dtype):
    from mquant.runtime.fused_norm import norm_kind, norm_params, norm_quantize

    norm = _norms_of_every_kind()[kind].to(dtype)
    assert norm_kind(norm) == kind
    # mean(x^2) = 4 and mean 0: the norm halves the row exactly, putting every value on a tie of
    # the 0.5 grid (0.75 / 0.5 = 1.5); random rows around it.
    tie_row = torch.tensor([1.5, -1.5, 1.5, -1.5, 1.5, -1.5, 2.5, -3.5])
    x = torch.cat([tie_row[None], torch.randn(40, 8) * 3]).to(dtype)
    inner, outer = torch.tensor(0.5), torch.tensor(0.125)
    weight, bias, _ = norm_params(norm, kind)
    y, signed, unsigned, _ = norm_quantize(x, weight, bias, 0.0, kind, inner, outer, 0, 20, -128, 127, False, True, True)
    torch.testing.assert_close(y.float(), norm(x).float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    separate = int8_ops.quantize_two_blocks(y, inner, outer, 0, 20, -128, 127)
    assert torch.equal(signed, separate) and torch.equal(unsigned.int() - 128, separate.int())
    if kind == "weightless":  # the tie row is exact there: the ties were really tested
        assert (y[0, :6].float() / 0.5).abs().eq(1.5).all()
    y_dyn, codes, _, row_scale = norm_quantize(x, weight, bias, 0.0, kind, None, None, 0, 0, -128, 127, True, True, False)
    q, s = int8_ops.quantize_dynamic(y_dyn, 127)
    assert torch.equal(codes, q) and torch.equal(row_scale, s)


@pytest.mark.parametrize("recipe", ["mquant-w4a8", "quarot-w4a8-dynamic"])
def test_fused_norms_run_the_same_model(tiny_dirs, family, recipe, tmp_path_factory, monkeypatch):
    from mquant.runtime import fused_norm
    from mquant.runtime.fused_norm import QuantizingNorm

    monkeypatch.setattr(fused_norm, "NATIVE_BELOW", 0)  # the tiny models' inputs would run unfused
    path = _quantized_dir(tiny_dirs, family, recipe, tmp_path_factory)
    fused = mquant.load(path, backend="cpu-int8", dtype=torch.float32)
    plain = mquant.load(path, backend="cpu-int8", dtype=torch.float32)
    for name, module in list(plain.model.named_modules()):
        if isinstance(module, QuantizingNorm):
            plain.model.set_submodule(name, module.norm)
    norms = [m for m in fused.model.modules() if isinstance(m, QuantizingNorm)]
    assert len(norms) >= 4  # at least the decoder's two per layer
    for sample in synthetic_samples(3, 11):
        a, b = fused.logits(sample), plain.logits(sample)
        # The norm is the same computation compiled: float rounding (2.4e-7 of the max logit measured)
        # may still move a value across a code's rounding boundary, hence the one code step's bound.
        assert (a - b).abs().max() <= 3e-3 * b.abs().max()
        assert (a - b).abs().median() <= 1e-6 * b.abs().max()
        assert fused.generate([sample], 5) == plain.generate([sample], 5)
    # Every decoder norm stays fused and its readers found every input already quantized; a norm
    # whose reader reads its output otherwise (Qwen2-VL's token merger) stops after one call.
    lm = fused.family.language_model
    for name, norm in fused.model.named_modules():
        if isinstance(norm, QuantizingNorm):
            assert norm.fused_calls > 0
            assert norm.active or not name.startswith(lm)
            if norm.active:
                assert all(r.calls > 0 and r.quantizations == 0 for r in norm._readers)


@needs_native
def test_small_inputs_skip_the_fused_pass_and_share_one_native_quantization(tiny_dirs, tmp_path_factory):
    from mquant.runtime.fused_norm import QuantizingNorm

    path = _quantized_dir(tiny_dirs, "llava", "mquant-w4a8", tmp_path_factory)
    vlm = mquant.load(path, backend="cpu-int8", dtype=torch.float32)
    fake = mquant.load(path)
    sample = synthetic_samples(1, 11)[0]
    norms = [m for m in vlm.model.modules() if isinstance(m, QuantizingNorm)]
    rows = {}
    for norm in norms:
        norm.register_forward_hook(lambda m, args, out: rows.__setitem__(m, args[0].numel() // args[0].shape[-1]))
    ref, out = fake.logits(sample), vlm.logits(sample)
    assert (out - ref).abs().max() <= 3e-3 * ref.abs().max()
    assert norms and all(norm.fused_calls == 0 for norm in norms)
    for norm in norms:  # one call: one quantization per encoding its readers' kernels take, shared
        encodings = {r.gemm.unsigned_input(rows[norm], r.dtype) for r in norm._readers}
        assert max(r.calls for r in norm._readers) == 1
        assert sum(r.quantizations for r in norm._readers) == len(encodings)


@needs_native
@pytest.mark.parametrize("width", [64, 448, 704, 944])  # H_2^m, H_28 ⊗ H_16, H_44 ⊗ H_16, padded to 960
def test_the_native_online_hadamard_is_the_fast_transform(width):
    from mquant.runtime.online import NativeHadamard
    from mquant.transforms.hadamard import FastHadamard, hadamard_spec

    fast = FastHadamard(hadamard_spec(width))
    wrapped = NativeHadamard.wrap(fast)
    assert isinstance(wrapped, NativeHadamard)
    x = torch.randn(37, width + 5, generator=torch.Generator().manual_seed(width))[:, :width]  # strided rows
    exact = fast.double()(x.double())
    torch.testing.assert_close(wrapped(x.float()).double(), exact, rtol=0, atol=2e-6 * exact.abs().max().item())
    y = wrapped(x.bfloat16().reshape(1, 37, width))  # bf16 in, bf16 out: one rounding of the fp32 result
    assert y.dtype == torch.bfloat16 and y.shape == (1, 37, fast.spec.order)
    exact = fast.double()(x.bfloat16().double())
    assert torch.equal(y[0], exact.float().bfloat16()) or (y[0].double() - exact).abs().max() <= 2 ** -8 * exact.abs().max()
