"""Sizes in words a person reads at a glance."""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | float) -> str:
    """`n` bytes in the largest binary unit that leaves at least 1 of it, three significant
    figures: 0 B, 512 B, 4.00 KiB, 12.3 MiB, 77.0 GiB (negative sizes keep their sign)."""
    size, unit = abs(float(n)), 0
    while unit < len(UNITS) - 1 and round(size, _digits(size) if unit else 0) >= 1024:
        size /= 1024
        unit += 1
    sign = "-" if n < 0 else ""
    if unit == 0:
        return f"{sign}{int(size)} B"
    return f"{sign}{size:.{_digits(size)}f} {UNITS[unit]}"


def _digits(size: float) -> int:
    """Decimals for three significant figures (of `size` as rounded: 9.999 -> 10.0)."""
    d = 2 if size < 10 else 1 if size < 100 else 0
    return d - 1 if d and round(size, d) >= 10 ** (3 - d) else d
