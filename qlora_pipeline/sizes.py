"""Memory sizes as people write them: '24GiB', '24GB', '16000MiB' → bytes (the planner's --gpu-memory and the recipe's
memory_budget)."""

from __future__ import annotations

import re

KIB, MIB, GIB = 2**10, 2**20, 2**30
SIZE_UNITS = {"kib": KIB, "mib": MIB, "gib": GIB, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str, what: str = "--gpu-memory") -> int:
    """'24GiB', '24GB', '16000MiB', '1.5 TiB' → bytes. GiB/MiB are powers of 2, GB/MB powers of 10. Raises
    ValueError naming `what` (the option or key)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"{what}: {text!r} is not a size; write it as e.g. 24GiB, 24GB or 16000MiB")
    value = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"{what}: {text!r} must be more than 0")
    return int(value)
