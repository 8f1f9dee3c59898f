"""crc32c of joined byte strings from the crc32c of their parts, without reading the bytes again.

A shard's write needs three checksums of the same bytes: each chunk's own crc32c (Zarr's codec),
the chunk's crc bound to its place (`format.bound_crc`: the crc of a short prefix followed by the
chunk) and the shard's digest (the crc of all its bytes).  Each is a pass over the shard; with
`crc32c_concat` one pass over the chunks gives all three.

The algebra: a crc is the message's polynomial times x^32 mod P (plus terms from the initial
and final inversions that cancel here), so crc(A + B) = crc(A) · x^(8·len B) + crc(B) over GF(2).
"""

from __future__ import annotations

from functools import lru_cache

_POLY = 0x82F63B78  # Castagnoli's polynomial, bit-reflected: bit 31 holds x^0, bit 0 holds x^31
_ONE = 1 << 31  # the polynomial 1 in that representation
_X = 1 << 30  # the polynomial x


def _mul_mod(a: int, b: int) -> int:
    """a · b mod P (reflected representation)."""
    product = 0
    for bit in range(31, -1, -1):  # a's coefficients of x^0, x^1, ..., x^31
        if a >> bit & 1:
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1  # b ← b · x mod P
    return product


@lru_cache(maxsize=256)
def _x_pow_bytes(nbytes: int) -> int:
    """x^(8 · nbytes) mod P, by squaring (a shard uses a handful of distinct lengths)."""
    result, square, k = _ONE, _X, 8 * nbytes
    while k:
        if k & 1:
            result = _mul_mod(result, square)
        square = _mul_mod(square, square)
        k >>= 1
    return result


def crc32c_concat(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32c of A followed by B, from crc32c(A), crc32c(B) and B's length in bytes."""
    return _mul_mod(_x_pow_bytes(len_b), crc_a) ^ crc_b
