"""Config errors: each names the resource and field at fault, and all are reported together.

The xDS client NACKs an update with str(ConfigRejected), so an operator reading the
control plane's debug view sees every problem of the update at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared.resources import short_name

# report(field, message): records one error against the resource it was bound to.
ErrorReporter = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class ResourceError:
    type_url: str
    name: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{short_name(self.type_url)} {self.name}: {where}{self.message}"


class ConfigRejected(Exception):
    """An update that cannot be applied; the proxy keeps serving its previous config."""

    def __init__(self, errors: tuple[ResourceError, ...]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(error) for error in errors))


class ErrorList:
    """Collects ResourceErrors while a config compiles, so validation never stops at the first."""

    def __init__(self) -> None:
        self.errors: list[ResourceError] = []

    def reporter(self, type_url: str, name: str) -> ErrorReporter:
        """A `report(field, message)` bound to one resource."""

        def report(field: str, message: str) -> None:
            self.errors.append(ResourceError(type_url, name, field, message))

        return report

    def __len__(self) -> int:
        return len(self.errors)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigRejected(tuple(self.errors))
