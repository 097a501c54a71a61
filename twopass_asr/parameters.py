"""Checks of model parameter values shared by the Triton adapters and the plain-Python models."""

from __future__ import annotations


def whole_number(value: str, label: str, minimum: int = 1) -> int:
    """`value` as an int of at least `minimum`; ValueError naming `label` otherwise."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{label} must be a whole number >= {minimum}, got {value!r}")
    return number


__all__ = ["whole_number"]
