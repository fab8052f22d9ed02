import numpy as np
import pytest
import torch

from mquant.transforms.galois import factor_prime_power, quadratic_character
from mquant.transforms.hadamard import FastHadamard, construction, dense_hadamard, hadamard_matrix, hadamard_spec

# Qwen2-VL 2B/7B/72B widths and their vision towers, plus the embedded and tiny models' widths.
REQUIRED = [1280, 1536, 3584, 5120, 8192, 8960, 18944, 29568, 192, 448, 96, 384, 24, 32, 48, 40, 80, 160]


def _check(h: np.ndarray) -> None:
    n = h.shape[0]
    assert set(np.unique(h)) <= {-1, 1}
    hf = h.astype(np.float64)  # BLAS; exact, since every partial sum is an integer below 2^53
    assert np.array_equal(hf @ hf.T, n * np.eye(n))
    assert np.all(h[:, 0] == 1)  # normalized: the mean goes to channel 0 only


@pytest.mark.parametrize("order", [k for k in range(1, 261) if construction(k)])
def test_every_claimed_small_order_is_hadamard(order):
    _check(hadamard_matrix(order))


def test_prime_power_fields():
    assert factor_prime_power(243) == (3, 5) and factor_prime_power(12) is None
    chi = quadratic_character(25)
    assert (chi == 1).sum() == (chi == -1).sum() == 12 and chi[0] == 0
    for q in (25, 27, 49, 121, 125, 243, 343):
        order = q + 1 if q % 4 == 3 else 2 * (q + 1)
        assert construction(order).startswith("paley")
        _check(hadamard_matrix(order))


@pytest.mark.parametrize("n", REQUIRED)
def test_real_model_widths_need_no_padding(n):
    spec = hadamard_spec(n)
    assert spec.order == n and not spec.padded
    assert n % spec.k == 0 and (n // spec.k) & (n // spec.k - 1) == 0
    _check(hadamard_matrix(spec.k))


@pytest.mark.parametrize("n", [24, 192, 448, 1280, 3584, 4304, 1000, 7])
def test_fast_transform_equals_dense_product(n):
    spec = hadamard_spec(n)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    dense = torch.tensor(dense_hadamard(spec), dtype=torch.float64) / spec.order**0.5
    _check(dense_hadamard(spec))
    padded = torch.nn.functional.pad(x, (0, spec.order - n))
    fast = FastHadamard(spec).double()(x)
    assert fast.shape == (3, 2, spec.order)
    assert torch.allclose(fast, padded @ dense, atol=1e-12)
    # orthogonal: norms are preserved, and float32 agrees with the dense result closely
    assert torch.allclose(fast.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(FastHadamard(spec)(x.float()).double(), padded @ dense, atol=1e-5)


def test_unconstructible_width_is_padded_cheaply():
    spec = hadamard_spec(4304)  # SigLIP MLP = 269·16: no Sylvester/Paley/Kronecker construction
    assert spec.padded and spec.order == 4352 and spec.k == 68
    assert spec.to_json() == {"n": 4304, "order": 4352, "k": 68, "construction": "paley1(67)"}


def test_mean_concentrates_in_channel_zero():
    spec = hadamard_spec(3584)
    y = FastHadamard(spec).double()(torch.ones(1, 3584, dtype=torch.float64))
    assert y[0, 0].item() == pytest.approx(3584**0.5)
    assert y[0, 1:].abs().max().item() < 1e-9
