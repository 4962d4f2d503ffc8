"""Counter-based hashing: a 64-bit value for row ``idx`` of a named stream, the same whatever the
chunking, the process or the DataLoader worker (splitmix64). The split protocol, the sampled
negatives and the training stream all draw their randomness here.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on one Python int."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
    return z ^ (z >> 31)


def stream_key(*words: int | str) -> int:
    """A 64-bit key naming one random stream, e.g. ``stream_key(seed, "split")``."""
    h = 0x243F6A8885A308D3
    for w in words:
        if isinstance(w, str):
            w = int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little") ^ len(w)
        h = _mix_int((h ^ (int(w) & _MASK)) + _GOLDEN & _MASK)
    return h


def hash64(key: int, idx: np.ndarray) -> np.ndarray:
    """splitmix64 output ``idx`` of the stream ``key``: (M,) uint64, uniform, counter-based."""
    z = np.asarray(idx).astype(np.uint64) * np.uint64(_GOLDEN) + np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniform(key: int, idx: np.ndarray) -> np.ndarray:
    """(M,) float64 uniform in [0, 1) for counters ``idx`` of stream ``key``."""
    return (hash64(key, idx) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
