"""Memory sizes as people write them: '8GB', '7.5 GB', '8GiB', '512MiB'."""

from __future__ import annotations

import re

from lorasp_edge.errors import UserError

_UNITS = {"": None, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'8GB', '8G', '7.5 GB', '8192MB' (decimal: GB = 10^9) or '8GiB', '512MiB' (binary: GiB = 2^30) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match:
        raise UserError(f"memory '{text}' is not a size like 8GB, 7.5 GB, 8GiB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise UserError(f"memory '{text}': unknown unit '{match.group(2)}' (use B, KB, MB, GB, TB = powers of 1000, or KiB, MiB, GiB, TiB = powers of 1024)")
    if _UNITS[unit] is None:
        raise UserError(f"memory '{text}' needs a unit, e.g. {text}GB or {text}GiB")
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise UserError(f"memory '{text}' must be positive")
    return value
