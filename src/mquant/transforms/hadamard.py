"""Hadamard matrices of order n = K·2^m and the fast transform x -> xH/sqrt(n) (ALGORITHMS.md §4).

Constructions: Sylvester doubling (powers of two), Paley I (q ≡ 3 mod 4, order q+1) and Paley II
(q ≡ 1 mod 4, order 2(q+1)) over prime and prime-power fields, and Kronecker products. For a width n
the smallest constructible K with n = K·2^m is chosen; the run-time transform is then a butterfly of
small Sylvester matmuls over the 2^m part plus one K x K matmul — never a dense n x n product.
Where no construction exists (e.g. 4304 = 269·16) the width is zero-padded to the smallest
constructible size, which the spec records.

Every matrix is normalized so that its first column is all +1: the mean of x then lands in
channel 0 only (the outlier RMS removes, §6).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from mquant.transforms.galois import difference_table, factor_prime_power, quadratic_character

# -- constructions ----------------------------------------------------------------------------------


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    return quadratic_character(q)[difference_table(q)]


def _paley1(q: int) -> np.ndarray:
    """Order q+1, for a prime power q ≡ 3 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return np.eye(n, dtype=np.int64) + S


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1), for a prime power q ≡ 1 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = 1
    S[1:, 1:] = Q
    return np.kron(S, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(n, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


def _normalize(h: np.ndarray) -> np.ndarray:
    """Flip row signs so that the first column is all +1."""
    return h * h[:, :1]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def construction(n: int) -> str | None:
    """How to build a Hadamard matrix of order n, or None if no construction here reaches it."""
    if _is_power_of_two(n):
        return "sylvester"
    if n % 4:
        return None
    pk = factor_prime_power(n - 1)
    if pk and pk[0] != 2 and (n - 1) % 4 == 3:
        return f"paley1({n - 1})"
    pk = factor_prime_power(n // 2 - 1)
    if pk and pk[0] != 2 and (n // 2 - 1) % 4 == 1:
        return f"paley2({n // 2 - 1})"
    for a in range(2, int(math.isqrt(n)) + 1):  # Kronecker products of smaller constructible orders
        if n % a == 0 and construction(a) and construction(n // a):
            return f"kron({a},{n // a})"
    return None


@functools.lru_cache(maxsize=32)
def hadamard_matrix(n: int) -> np.ndarray:
    """The normalized (first column +1) integer Hadamard matrix of order n: H Hᵀ = n I."""
    how = construction(n)
    if how is None:
        raise ValueError(f"no Hadamard construction of order {n}")
    if how == "sylvester":
        h = _sylvester(n)
    elif how.startswith("paley1"):
        h = _paley1(n - 1)
    elif how.startswith("paley2"):
        h = _paley2(n // 2 - 1)
    else:
        a, b = (int(v) for v in how[5:-1].split(","))
        h = np.kron(hadamard_matrix(a), hadamard_matrix(b))
    return _normalize(h)


# -- choosing K -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HadamardSpec:
    """A Hadamard transform for activations of width `n`.

    `order` = K · 2^m is the size actually transformed (`order > n` only when n had to be
    zero-padded); `k` is the dense factor and `construction` says how H_K was built.
    """

    n: int
    order: int
    k: int
    construction: str

    @property
    def padded(self) -> bool:
        return self.order != self.n

    def to_json(self) -> dict:
        return {"n": self.n, "order": self.order, "k": self.k, "construction": self.construction}


def _k_candidates(n: int) -> list[int]:
    """K = o·2^j (n = o·2^e, o odd, j <= e) with K in {1, 2} or 4 | K, smallest first."""
    e = (n & -n).bit_length() - 1
    o = n >> e
    return sorted(k for k in (o << j for j in range(e + 1)) if k in (1, 2) or k % 4 == 0)


def _best_k(n: int) -> int | None:
    return next((k for k in _k_candidates(n) if construction(k)), None)


@functools.lru_cache(maxsize=None)
def hadamard_spec(n: int) -> HadamardSpec:
    """The transform for width n: exact when a construction reaches n (smallest K), otherwise the
    cheapest zero-padded order up to n + n/4 (else the next power of two).

    Padding cost per row: order·K multiply-adds for the dense part plus (order - n) extra weight
    columns per output channel (counted as n); e.g. 4304 -> 4352 = 68·64 rather than 4480 = 140·32.
    """
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    k = _best_k(n)
    if k is not None:
        return HadamardSpec(n, n, k, construction(k))
    best = None
    for order in range(n + 1, n + n // 4 + 1):
        k = _best_k(order)
        if k is not None:
            cost = order * k + (order - n) * n
            if best is None or cost < best[0]:
                best = (cost, order, k)
    if best is None:
        order = 1 << (n - 1).bit_length()
        return HadamardSpec(n, order, 1, "sylvester")
    _, order, k = best
    return HadamardSpec(n, order, k, construction(k))


# -- the transform ----------------------------------------------------------------------------------


def _pow2_factors(p: int, block: int = 64, single: int = 256) -> list[int]:
    """Split 2^m into Sylvester blocks applied as small matmuls: one block up to `single` (a
    128-wide matmul beats a 64 x 2 pair, whose 2-wide product is all overhead), else blocks of at
    most `block`. Sylvester matrices are Kronecker powers of H_2, so any split is the same matrix."""
    if p <= single:
        return [p] if p > 1 else []
    out = []
    while p > 1:
        out.append(min(p, block))
        p //= out[-1]
    return out


class FastHadamard(torch.nn.Module):
    """x -> (x zero-padded to `order`) · H / sqrt(order), with H = H_K ⊗ H_{2^m}.

    The 2^m part is applied as a Kronecker product of small Sylvester matmuls, the K part as one
    K x K matmul; cost O(order · (K + log order)) per row instead of O(order²).
    """

    def __init__(self, spec: HadamardSpec) -> None:
        super().__init__()
        self.spec = spec
        p = spec.order // spec.k
        self.blocks = _pow2_factors(p)
        for i, b in enumerate(self.blocks):
            self.register_buffer(f"h{i}", torch.tensor(_sylvester(b), dtype=torch.float32), persistent=False)
        self.register_buffer("hk", torch.tensor(hadamard_matrix(spec.k), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.padded:
            x = torch.nn.functional.pad(x, (0, spec.order - spec.n))
        lead = x.shape[:-1]
        rows = x.numel() // spec.order
        dims = [spec.k, *self.blocks]
        mats = [self.hk, *(getattr(self, f"h{i}") for i in range(len(self.blocks)))]
        y = x.reshape(rows, spec.order)
        # Each factor acts on one axis of y viewed as [rows, *dims], as a plain matmul on a
        # contiguous view (no transposes): the last axis by right-multiplication, any other by
        # left-multiplication with the transposed factor, batched over the axes before it.
        # (xH)[a'] = sum_a x[a] H[a, a']; Sylvester blocks are symmetric, H_K in general is not.
        for axis, (d, h) in enumerate(zip(dims, mats)):
            if d == 1:
                continue
            before, after = rows * math.prod(dims[:axis]), math.prod(dims[axis + 1:])
            h = h.to(y.dtype)
            if after == 1:
                y = y.reshape(before, d) @ h
            else:
                y = torch.matmul(h.t(), y.reshape(before, d, after))
        return y.reshape(*lead, spec.order) / math.sqrt(spec.order)


def dense_hadamard(spec: HadamardSpec) -> np.ndarray:
    """The full order x order integer matrix H_K ⊗ H_{2^m} (tests and offline fusion)."""
    return np.kron(hadamard_matrix(spec.k), _sylvester(spec.order // spec.k))
