"""Deterministic per-row randomness for Spark: hashes of row keys, not ``rand()``.

``F.rand(seed)`` depends on partitioning and row order, which joins and shuffles change;
a hash of the row's own key and a salt gives the same draw wherever the row lands.
"""
from __future__ import annotations

import math

from pyspark.sql import Column
from pyspark.sql import functions as F

_MANTISSA = (1 << 53) - 1


def uniform(seed: int, salt: str, *keys) -> Column:
    """U[0, 1) drawn from xxhash64(keys, seed, salt)."""
    h = F.xxhash64(*[F.col(k) if isinstance(k, str) else k for k in keys], F.lit(seed), F.lit(salt))
    return (F.abs(h) % F.lit(_MANTISSA)).cast("double") / F.lit(float(_MANTISSA))


def normal(seed: int, salt: str, *keys) -> Column:
    """N(0, 1) by Box-Muller from two hashed uniforms."""
    u1 = uniform(seed, salt + ":1", *keys)
    u2 = uniform(seed, salt + ":2", *keys)
    return F.sqrt(-2.0 * F.log(F.greatest(u1, F.lit(1e-12)))) * F.cos(2.0 * math.pi * u2)
