"""Stable sampling seeds: a 31-bit seed from a hash of a request's coordinates (``docs/algorithms.md`` "Sampling
seeds"), the same in every process and on every run, unlike Python's salted ``hash``.

The call sites hash different coordinates with different functions, kept so that existing runs keep their samples:
the training driver (run seed, step, prompt slot) with SHA-256, evaluation (seed, benchmark, problem id) with CRC-32,
DC-CoT segments and environment steps with 8-byte BLAKE2b. New call sites use the default.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Literal

Digest = Literal["blake2b", "sha256", "crc32"]
SEED_MASK = 0x7FFFFFFF  # 31 bits: a valid seed for every engine (vLLM, torch, numpy, random)


def stable_seed(*parts: object, sep: str = ":", digest: Digest = "blake2b") -> int:
    """A seed in [0, 2**31) from ``sep.join(str(p) for p in parts)``: the key's ``digest`` (BLAKE2b with an
    8-byte digest, SHA-256, or CRC-32), its first four bytes read little-endian, top bit cleared."""
    key = sep.join(str(p) for p in parts).encode()
    if digest == "crc32":
        return zlib.crc32(key) & SEED_MASK
    if digest == "sha256":
        raw = hashlib.sha256(key).digest()
    elif digest == "blake2b":
        raw = hashlib.blake2b(key, digest_size=8).digest()
    else:
        raise ValueError(f"unknown seed digest {digest!r}; valid: blake2b, sha256, crc32")
    return int.from_bytes(raw[:4], "little") & SEED_MASK
