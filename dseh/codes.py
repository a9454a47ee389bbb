"""Binary codes: sign with sign(0) = +1, and packing to bits.

Convention: a code is a vector in {-1, +1}^K. Packed, bit 1 stands for +1 and bit 0 for -1,
most significant bit first within each byte (numpy.packbits' default order), rows padded with
0 bits to a whole number of bytes. Padding bits are equal in every code, so Hamming distances
between packed rows equal those between the +-1 vectors.
"""

from __future__ import annotations

import numpy as np


def packed_width(bits: int) -> int:
    """Bytes per packed code of `bits` bits."""
    return -(-bits // 8)


def sign(x: np.ndarray) -> np.ndarray:
    """+-1 codes as int8, with sign(0) = +1, so a code never holds 0."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int8)


def pack(codes: np.ndarray) -> np.ndarray:
    """(N, K) codes in {-1, +1} (or real values, signed first) -> (N, ceil(K/8)) uint8."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, bits), got shape {codes.shape}")
    return np.packbits(codes >= 0, axis=1)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """(N, B) uint8 -> (N, bits) int8 codes in {-1, +1}."""
    b = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)
    return (b.astype(np.int8) * 2 - 1).astype(np.int8)


def to_words(packed: np.ndarray) -> np.ndarray:
    """(N, B) uint8 -> (N, ceil(B/8)) uint64, zero padded, for XOR + popcount."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    n, nbytes = packed.shape
    width = -(-nbytes // 8) * 8
    if width != nbytes:
        packed = np.concatenate([packed, np.zeros((n, width - nbytes), dtype=np.uint8)], axis=1)
    return packed.view(np.uint64)


def count_distinct(packed: np.ndarray) -> int:
    """Number of distinct codes among packed rows."""
    return int(len(np.unique(np.asarray(packed), axis=0)))


def constant_bits(packed: np.ndarray, bits: int) -> int:
    """Number of bit positions that hold the same value in every packed row (a sign of collapse)."""
    b = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)
    return int((b.min(axis=0) == b.max(axis=0)).sum()) if len(b) else 0


def collapse(packed: np.ndarray, bits: int, min_distinct: int, label_sets: int | None = None) -> dict:
    """Signs of collapsed codes over a database: every bit constant, or fewer distinct codes than
    `min_distinct` (capped at the database's number of distinct label sets `label_sets`, so a model
    that gives each of 10 classes one code is not called collapsed)."""
    constant = constant_bits(packed, bits)
    distinct = count_distinct(packed)
    floor = min(min_distinct, label_sets) if label_sets else min_distinct
    return {"constant_bits": constant, "distinct_codes": distinct, "collapsed": constant == bits or distinct < floor}
