"""ConfigError: one problem found in user configuration, located precisely enough to fix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigError:
    """A configuration problem: where it is (file, object, field) and what is wrong.

    `str(err)` is one line an operator can act on, e.g.
    ``routes.yaml: HTTPRoute default/web: spec.rules[0].matches[0].path.value: invalid regular expression: ...``.
    Errors without an object (a YAML syntax error) carry a line and column instead.
    """

    message: str
    file: str = ""
    kind: str = ""
    namespace: str = ""
    name: str = ""
    field: str = ""
    # 1-based position in `file`; 0 when unknown or irrelevant.
    line: int = 0
    column: int = 0

    @property
    def object_ref(self) -> str:
        """'namespace/name', or just 'name' for cluster-scoped objects."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file:
            location = self.file
            if self.line:
                location += f":{self.line}"
                if self.column:
                    location += f":{self.column}"
            parts.append(location)
        if self.kind:
            parts.append(f"{self.kind} {self.object_ref}".rstrip())
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)
