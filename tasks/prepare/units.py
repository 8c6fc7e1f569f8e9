"""Unit conversion to the consortium's canonical units.

Each known unit maps to its dimension's canonical unit by ``canonical = raw * scale + offset``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import polars as pl


class Unit(NamedTuple):
    dimension: str
    scale: float
    offset: float = 0.0


#: Standard gravity in m/s² (the unit ``g`` of accelerometers).
STANDARD_GRAVITY = 9.80665

#: Canonical units: money in currency units, energy in kWh, temperature in °C, time in
#: seconds, acceleration in m/s² (``m/s2``) and angular velocity in rad/s.
UNITS: dict[str, Unit] = {
    "currency": Unit("money", 1.0),
    "cents": Unit("money", 0.01),
    "kWh": Unit("energy", 1.0),
    "Wh": Unit("energy", 0.001),
    "MWh": Unit("energy", 1000.0),
    "C": Unit("temperature", 1.0),
    "F": Unit("temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": Unit("temperature", 1.0, -273.15),
    "s": Unit("duration", 1.0),
    "ms": Unit("duration", 0.001),
    "min": Unit("duration", 60.0),
    "h": Unit("duration", 3600.0),
    "m/s2": Unit("acceleration", 1.0),
    "g": Unit("acceleration", STANDARD_GRAVITY),
    "rad/s": Unit("angular_velocity", 1.0),
    "deg/s": Unit("angular_velocity", math.pi / 180.0),
}


def to_canonical(expr: pl.Expr, unit: str | None) -> pl.Expr:
    """Convert a numeric expression from ``unit`` to its dimension's canonical unit."""
    if unit is None:
        return expr
    u = UNITS[unit]
    out = expr.cast(pl.Float64)
    if u.scale != 1.0:
        out = out * u.scale
    if u.offset != 0.0:
        out = out + u.offset
    return out
