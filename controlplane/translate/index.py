"""ObjectIndex: the translator's lookup tables over one set of objects, built once per pass.

It validates every object (the Kubernetes source hands over objects no one has checked
against our rules), keeps the valid ones by identity, and answers the questions the
Gateway API asks across objects: a namespace's labels, whether a label selector matches,
whether a ReferenceGrant permits a cross-namespace reference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.model import (
    NAMESPACE,
    REFERENCE_GRANT,
    ConfigError,
    KubeObject,
    ObjectKey,
    validate,
)
from shared.logging import get_logger

log = get_logger("controlplane.translate")

# Kubernetes sets this label on every namespace; we do too, so selectors written for a
# cluster work for a folder that declares no Namespace objects.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


class ObjectIndex:
    def __init__(self, objects: Iterable[KubeObject]) -> None:
        self.valid: dict[ObjectKey, KubeObject] = {}
        self.invalid: dict[ObjectKey, tuple[KubeObject, list[ConfigError]]] = {}
        self._by_kind: dict[str, list[KubeObject]] = defaultdict(list)
        self._grants: dict[str, list[KubeObject]] = defaultdict(list)
        for obj in objects:
            if obj.key in self.valid or obj.key in self.invalid:
                log.debug("duplicate object ignored", object=str(obj.key))
                continue
            errors = validate(obj)
            if errors:
                self.invalid[obj.key] = (obj, errors)
                continue
            self.valid[obj.key] = obj
            self._by_kind[obj.kind].append(obj)
            if obj.kind == REFERENCE_GRANT:
                self._grants[obj.namespace].append(obj)
        for items in self._by_kind.values():
            items.sort(key=lambda o: o.key)

    def get(self, kind: str, namespace: str, name: str) -> KubeObject | None:
        return self.valid.get(ObjectKey(kind, namespace, name))

    def problem(self, kind: str, namespace: str, name: str) -> str:
        """Why an object cannot be used: invalid (with its first error) or not found."""
        key = ObjectKey(kind, namespace, name)
        if key in self.invalid:
            return f"{key} is invalid: {describe_errors(self.invalid[key][1])}"
        return f"{key} not found"

    def of_kind(self, kind: str) -> Sequence[KubeObject]:
        return self._by_kind.get(kind, ())

    def invalid_of_kind(self, kind: str) -> list[tuple[KubeObject, list[ConfigError]]]:
        return sorted((entry for key, entry in self.invalid.items() if key.kind == kind), key=lambda e: e[0].key)

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        obj = self.get(NAMESPACE, "", namespace)
        labels = dict(obj.labels) if obj else {}
        labels[NAMESPACE_NAME_LABEL] = namespace
        return labels

    def reference_permitted(
        self,
        *,
        from_group: str,
        from_kind: str,
        from_namespace: str,
        to_group: str,
        to_kind: str,
        to_namespace: str,
        to_name: str,
    ) -> bool:
        """Same-namespace references always are; others need a ReferenceGrant in the target namespace."""
        if from_namespace == to_namespace:
            return True
        for grant in self._grants.get(to_namespace, ()):
            sources = grant.spec.get("from") or ()
            targets = grant.spec.get("to") or ()
            source_ok = any(
                s.get("group") == from_group and s.get("kind") == from_kind and s.get("namespace") == from_namespace
                for s in sources
            )
            target_ok = any(
                t.get("group", "") == to_group and t.get("kind") == to_kind and t.get("name", to_name) == to_name
                for t in targets
            )
            if source_ok and target_ok:
                return True
        return False


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics; an empty selector matches everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, operator, values = expr.get("key"), expr.get("operator"), expr.get("values") or ()
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def describe_errors(errors: Sequence[ConfigError], limit: int = 3) -> str:
    """A short summary of validation errors for a status message."""
    shown = "; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors[:limit])
    if len(errors) > limit:
        shown += f" (and {len(errors) - limit} more)"
    return shown
