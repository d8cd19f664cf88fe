"""A seeded shuffle of ``range(n)`` that costs no memory: a Feistel bijection with cycle walking.

Per-document samples visit every document once per epoch in a shuffled order. Holding that
order as an array costs 8 bytes a document on every rank and data-loader worker (2.9 GB for
C4 en's 365M documents) and seconds to draw at each epoch's first sample. A keyed Feistel
network is a bijection of ``[0, 4^k)``; walking the cycle until the value falls below ``n``
restricts it to a bijection of ``[0, n)`` (the domain is under ``4n``, so under four walks on
average). Each position maps to its document in O(1) time and memory, as a function of the
seed and the position alone.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6  # Luby-Rackoff: 4 make a pseudo-random permutation; 6 for margin
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: every input bit flips each output bit with probability ~1/2."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelOrder:
    """``order(i)`` for ``i`` in ``[0, n)`` is a permutation of ``[0, n)`` set by ``seed``."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a shuffle of {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64((seed & _M64) * ROUNDS + r + 1) for r in range(ROUNDS)]

    def _permute(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} of a shuffle of {self.n}")
        x = self._permute(i)
        while x >= self.n:  # walk the cycle back into [0, n)
            x = self._permute(x)
        return x

    def __len__(self) -> int:
        return self.n

    def many(self, positions) -> np.ndarray:
        """``order(i)`` for each position (for tests and tools; training asks one at a time)."""
        return np.fromiter((self(int(i)) for i in positions), dtype=np.int64)
