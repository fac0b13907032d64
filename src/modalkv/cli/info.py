"""``modalkv methods``: the registered methods and storage formats."""

from __future__ import annotations

import dataclasses

from rich.table import Table

from ..methods import REGISTRY
from ..storage import storage_names
from .common import console


def methods() -> None:
    """List the available methods (and storage formats) with one line each."""
    table = Table(show_header=True, header_style="bold")
    table.add_column("method")
    table.add_column("parameters")
    table.add_column("what it does")
    for name, cls in REGISTRY.items():
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.init)
        table.add_row(name, params, cls.summary)
    console.print(table)
    console.print(f"Quantized storage (composes with any method, --quantize): {', '.join(storage_names())}")
    console.print("Continual adaptation (not a compression method): InduceKV, a fixed-size bank of induced KV "
                  "memories for a frozen model (modalkv.continual; benchmark: modalkv continual)")
