"""Label and field selectors as kube-apiserver parses them from ``?labelSelector=`` and
``?fieldSelector=``, and the patch formats it accepts (JSON merge patch, JSON patch)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any


class SelectorError(ValueError):
    """A selector or patch the API server would refuse with 400 BadRequest."""


_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SET_TERM = re.compile(r"^\s*(!?)\s*([^\s!=()]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_OPERATOR_TERM = re.compile(r"^\s*([^\s!=()]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")

LabelPredicate = Callable[[Mapping[str, str]], bool]


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses ("a in (x,y),b" is two terms)."""
    terms, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:position])
            start = position + 1
    terms.append(text[start:])
    return [term for term in terms if term.strip()]


def label_selector(text: str) -> LabelPredicate:
    """A predicate over labels for a selector like ``app=x,tier!=db,env in (a,b),!legacy``."""
    checks: list[LabelPredicate] = []
    for term in _split_terms(text):
        operator = _OPERATOR_TERM.match(term)
        if operator is not None:
            key, op, value = operator.groups()
            _check_key(key, text)
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        matched = _SET_TERM.match(term)
        if matched is None:
            raise SelectorError(f"unable to parse requirement: {term.strip()!r} in {text!r}")
        negated, key, op, values = matched.groups()
        _check_key(key, text)
        if op is None:
            checks.append((lambda labels, k=key: k not in labels) if negated else (lambda labels, k=key: k in labels))
            continue
        if negated:
            raise SelectorError(f"unable to parse requirement: {term.strip()!r} in {text!r}")
        wanted = frozenset(v.strip() for v in values.split(",") if v.strip())
        if op == "in":
            checks.append(lambda labels, k=key, w=wanted: labels.get(k) in w)
        else:
            checks.append(lambda labels, k=key, w=wanted: labels.get(k) not in w)
    return lambda labels: all(check(labels) for check in checks)


def _check_key(key: str, text: str) -> None:
    if not _LABEL_KEY.match(key):
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r} in {text!r}")


FIELDS = ("metadata.name", "metadata.namespace")


def field_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """``metadata.name`` and ``metadata.namespace`` with =, == and != (what every resource serves)."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_terms(text):
        matched = _OPERATOR_TERM.match(term)
        if matched is None:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {term.strip()!r}")
        field, op, value = matched.groups()
        if field not in FIELDS:
            raise SelectorError(f'field label not supported: {field}')
        attribute = field.split(".", 1)[1]

        def check(obj: Mapping[str, Any], a: str = attribute, v: str = value, equal: bool = op != "!=") -> bool:
            return ((obj.get("metadata") or {}).get(a, "") == v) == equal

        checks.append(check)
    return lambda obj: all(check(obj) for check in checks)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 add, remove, replace, test, move and copy over a deep copy of ``target``."""
    if not isinstance(operations, list):
        raise SelectorError("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    document = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or not isinstance(operation.get("path"), str):
            raise SelectorError(f"invalid JSON patch operation: {operation!r}")
        op, path = operation.get("op"), operation["path"]
        if op == "test":
            if _get(document, path) != operation.get("value"):
                raise SelectorError(f"testing value {path} failed")
        elif op == "remove":
            _remove(document, path)
        elif op in ("add", "replace"):
            if "value" not in operation:
                raise SelectorError(f"missing value for {op} at {path}")
            if op == "replace":
                _get(document, path)
            document = _add(document, path, copy.deepcopy(operation["value"]), replace=op == "replace")
        elif op in ("move", "copy"):
            source = operation.get("from")
            if not isinstance(source, str):
                raise SelectorError(f"missing from for {op} at {path}")
            value = copy.deepcopy(_get(document, source))
            if op == "move":
                _remove(document, source)
            document = _add(document, path, value, replace=False)
        else:
            raise SelectorError(f"unexpected JSON patch operation {op!r}")
    return document


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise SelectorError(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _step(container: Any, part: str, path: str) -> Any:
    if isinstance(container, dict):
        if part not in container:
            raise SelectorError(f"doc is missing path: {path!r}")
        return container[part]
    if isinstance(container, list) and part.isdigit() and int(part) < len(container):
        return container[int(part)]
    raise SelectorError(f"doc is missing path: {path!r}")


def _get(document: Any, path: str) -> Any:
    for part in _pointer(path):
        document = _step(document, part, path)
    return document


def _add(document: Any, path: str, value: Any, *, replace: bool) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _get(document, "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts[:-1])) \
        if len(parts) > 1 else document
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            if replace:
                parent[int(last)] = value
            else:
                parent.insert(int(last), value)
        else:
            raise SelectorError(f"doc is missing path: {path!r}")
    else:
        raise SelectorError(f"doc is missing path: {path!r}")
    return document


def _remove(document: Any, path: str) -> None:
    parts = _pointer(path)
    if not parts:
        raise SelectorError("cannot remove the whole document")
    parent = document
    for part in parts[:-1]:
        parent = _step(parent, part, path)
    _step(parent, parts[-1], path)
    if isinstance(parent, dict):
        del parent[parts[-1]]
    else:
        del parent[int(parts[-1])]
