"""Turn core results into Dagster metadata: numbers, tables and inline PNG figures."""

from __future__ import annotations

import base64
import math

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def numbers(values: dict, prefix: str = "") -> dict[str, dg.MetadataValue]:
    """Finite numbers as float/int metadata (plotted over time by the UI); other values as text."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out[prefix + key] = dg.MetadataValue.text(str(value))
        elif isinstance(value, int):
            out[prefix + key] = dg.MetadataValue.int(value)
        elif math.isfinite(value):
            out[prefix + key] = dg.MetadataValue.float(float(value))
    return out


def table(rows: list[dict]) -> dg.MetadataValue:
    columns = list(rows[0]) if rows else []
    kinds = {bool: "bool", int: "int", float: "float"}
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kinds.get(type(rows[0][name]), "string"))
                                     for name in columns])
    return dg.MetadataValue.table(
        [dg.TableRecord({k: (v if isinstance(v, (int, float, bool)) else "" if v is None else str(v))
                         for k, v in row.items()})
         for row in rows], schema=schema)
