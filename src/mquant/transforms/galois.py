"""Finite fields GF(p^k), just enough for the Paley constructions: subtraction and squares.

Elements are integers 0..q-1 whose base-p digits are the polynomial coefficients (lowest first).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np


def factor_prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); f monic, coefficients lowest first."""
    a = a[:]
    while len(a) >= len(f):
        c = a[-1] % p
        shift = len(a) - len(f)
        for i, fi in enumerate(f):
            a[shift + i] = (a[shift + i] - c * fi) % p
        a.pop()
    return a


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p), found by trial division."""
    if k == 1:
        return [0, 1]
    for tail in itertools.product(range(p), repeat=k):
        f = list(tail) + [1]
        if f[0] == 0:
            continue
        reducible = False
        for d in range(1, k // 2 + 1):
            for g_tail in itertools.product(range(p), repeat=d):
                if not any(_poly_mod(f, list(g_tail) + [1], p)):
                    reducible = True
                    break
            if reducible:
                break
        if not reducible:
            return f
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")


@functools.lru_cache(maxsize=None)
def quadratic_character(q: int) -> np.ndarray:
    """chi(a) for every element a of GF(q): 0 for 0, +1 for nonzero squares, -1 otherwise."""
    pk = factor_prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"{q} is not an odd prime power")
    p, k = pk
    f = _irreducible(p, k)
    digits = _digits(q, p, k)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    weights = p ** np.arange(k)
    for a in range(1, q):
        c = digits[a]
        prod = [0] * (2 * k - 1)
        for i in range(k):
            for j in range(k):
                prod[i + j] += int(c[i]) * int(c[j])
        square = _poly_mod([x % p for x in prod], f, p) + [0] * k
        chi[int(np.dot(square[:k], weights))] = 1
    return chi


def _digits(q: int, p: int, k: int) -> np.ndarray:
    return (np.arange(q)[:, None] // (p ** np.arange(k))[None, :]) % p


def difference_table(q: int) -> np.ndarray:
    """D[a, b] = a - b in GF(q), as element indices."""
    p, k = factor_prime_power(q)
    d = _digits(q, p, k)
    diff = (d[:, None, :] - d[None, :, :]) % p
    return diff @ (p ** np.arange(k))
