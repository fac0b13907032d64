"""What every command shares: the consoles, the one-line error exit, and parsing of budgets and KEY=VALUE pairs."""

from __future__ import annotations

import json

import typer
from rich.console import Console

console = Console(width=max(120, Console().width))
err_console = Console(stderr=True)


def fail(message: str) -> None:
    """A bad input: one line on stderr, exit code 2, no traceback."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_budget(text: str) -> float | int:
    """'0.25' -> 0.25 (ratio), '512' -> 512 (tokens)."""
    try:
        return int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise ValueError(f"budget must be a ratio in (0, 1] or a token count, got {text!r}") from None


def parse_params(items: list[str]) -> dict:
    """KEY=VALUE pairs, values parsed as JSON when possible (so window=8 is an int, pooling=avg a string)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method parameter {item!r} must look like KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
