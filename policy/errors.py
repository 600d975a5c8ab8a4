"""Diagnostics for configuration loading: ``file:line: Kind ns/name: field.path: message``.

Pure data; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["Diagnostic", "ConfigError", "format_diagnostics"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One error or warning about a configuration file.

    ``str(d)`` is ``file:line: Kind namespace/name: spec.path: message``; the parts that are
    unknown are left out (a YAML syntax error has no object, a missing file has no line).
    """
    file: str
    line: int | None
    message: str
    obj: str | None = None        # "VirtualService shop/reviews"
    path: str | None = None       # "spec.http[0].route[1].weight"
    severity: str = "error"       # "error" | "warning"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where]
        if self.severity == "warning":
            parts.append("warning")
        if self.obj:
            parts.append(self.obj)
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


def format_diagnostics(diags: Iterable[Diagnostic]) -> str:
    return "\n".join(str(d) for d in diags)


class ConfigError(Exception):
    """Raised when configuration is invalid; carries every error (and the warnings)."""

    def __init__(self, errors: Iterable[Diagnostic], warnings: Iterable[Diagnostic] = ()):
        self.errors = tuple(errors)
        self.warnings = tuple(warnings)
        n = len(self.errors)
        super().__init__(f"{n} configuration error{'s' if n != 1 else ''}:\n" + format_diagnostics(self.errors))
