"""CEL expressions for policies: compiled once when a snapshot is applied, evaluated per request.

The engine is PyPI ``common-expression-language`` (module ``cel``, a Rust interpreter). Two facts about it
shape this module:

- Compiling parses only; a reference to a variable or function nobody defines surfaces at evaluation time.
  ``compile_expression`` closes that gap so a misspelt name is a config error naming the policy field and the
  position (``CelCompileError``), not a request that is denied forever.
- Evaluation is cheap (well under a microsecond for a comparison), but handing Python values to the engine is
  not: every dict entry and string is converted, a few microseconds each, so converting a dozen headers and
  claims costs more than every rule together. So each expression records which parts of each variable it
  reads (``Usage``: ``request.headers['x-tenant']`` reads one header, ``size(jwt)`` the whole claims map), and
  a request converts only those parts, once, into one ``cel.Context`` shared by every rule of a set. Pruning
  never changes a result: whatever an expression can observe is kept whole.

Evaluation never raises to the request path: ``Expression.holds`` answers True, False, or None for an error or
a non-bool result (logged, with the field), and the caller decides what None means (authorization denies).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cel as _cel

from shared.logging import get_logger

log = get_logger("dataplane.policy.cel")

# The variables a request exposes to policy expressions (values built in ``authorize.py``).
VARIABLES: tuple[str, ...] = ("jwt", "request", "source", "mcp", "a2a", "llm")

# Identifiers the engine itself resolves: type names (``type(x) == string``) and the ``optional`` namespace.
_BUILTIN_NAMES = frozenset(
    {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type", "optional"}
)
# Functions and methods the engine defines (its standard library; the Python-side extension library is not
# registered). Calls to anything else can only fail, so they are refused at compile time.
KNOWN_FUNCTIONS = frozenset(
    {
        "size", "contains", "startsWith", "endsWith", "matches",
        "string", "bytes", "double", "int", "uint", "dyn", "type", "duration", "timestamp",
        "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate", "getDayOfWeek",
        "getHours", "getMinutes", "getSeconds", "getMilliseconds",
        "of", "ofNonZeroValue", "none", "value", "hasValue", "orValue", "or",
    }
)  # fmt: skip
# Macros that bind a variable: ``list.exists(x, x > 1)``.
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_PARSE_POSITION = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")
# Distinct evaluation failures logged at warning per expression; repeats go to debug so a broken rule on a
# busy route cannot flood the log.
_LOGGED_FAILURES = 32


class CelCompileError(ValueError):
    """A policy expression that cannot be used: syntax, unknown variable or unknown function.

    ``policy`` names the policy resource (when known) and ``field`` its field (e.g. ``authorization.allow[1]``);
    ``line`` and ``column`` (1-based) point into ``expression`` when known. Raised when a snapshot is applied,
    so the snapshot is refused as a whole.
    """

    def __init__(
        self,
        field: str,
        expression: str,
        reason: str,
        line: int | None = None,
        column: int | None = None,
        policy: str | None = None,
    ) -> None:
        self.policy = policy
        self.field = field
        self.expression = expression
        self.reason = reason
        self.line = line
        self.column = column
        where = f" at {line}:{column}" if line is not None else ""
        owner = f"policy {policy!r} " if policy is not None else ""
        super().__init__(f"{owner}{field}: {reason}{where} in CEL expression {expression!r}")


# Lexing, for the static analysis the engine does not offer -------------------------------------------------

_IDENT, _STRING, _PUNCT, _OTHER = range(4)
_TOKEN = re.compile(
    r"""
    (?P<space>\s+|//[^\n]*)
    |(?P<quote>(?:[rR][bB]?|[bB][rR]?)?(?:'''|\"\"\"|'|\"))
    |(?P<number>0[xX][0-9a-fA-F]+[uU]?|\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+(?:[eE][+-]?\d+)?|\d+[uU]?)
    |(?P<ident>[_A-Za-z][_A-Za-z0-9]*)
    |(?P<punct>[.\[\](),])
    |(?P<other>[-+*/%!<>=&|?:{}])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: int
    text: str  # identifier name, punctuation; for strings the value, or "" if it is not a plain text literal
    offset: int
    plain: bool = True  # strings: a text literal without escapes, so ``text`` is exactly its value


def _lex(source: str) -> list[_Token] | None:
    """Tokens of an expression the engine already parsed; None if this lexer cannot follow it."""
    tokens: list[_Token] = []
    pos, end = 0, len(source)
    while pos < end:
        match = _TOKEN.match(source, pos)
        if match is None:
            return None
        kind = match.lastgroup
        if kind == "quote":
            opener = match.group()
            prefix = opener.rstrip("'\"")
            quote = opener[len(prefix) :]
            raw = "r" in prefix.lower()
            start = i = match.end()
            escaped = False
            while not source.startswith(quote, i):
                if i >= end:
                    return None
                if source[i] == "\\" and not raw:
                    escaped = True
                    i += 1
                i += 1
            plain = not escaped and "b" not in prefix.lower()
            tokens.append(_Token(_STRING, source[start:i] if plain else "", pos, plain))
            pos = i + len(quote)
            continue
        if kind == "ident":
            tokens.append(_Token(_IDENT, match.group(), pos))
        elif kind == "punct":
            tokens.append(_Token(_PUNCT, match.group(), pos))
        elif kind != "space":
            tokens.append(_Token(_OTHER, match.group(), pos))
        pos = match.end()
    return tokens


def _position(source: str, offset: int) -> tuple[int, int]:
    line = source.count("\n", 0, offset) + 1
    return line, offset - (source.rfind("\n", 0, offset) + 1) + 1


def _punct(tokens: list[_Token], i: int, text: str) -> bool:
    """Whether token ``i`` exists and is the punctuation ``text`` (a string literal ``'.'`` is not)."""
    return 0 <= i < len(tokens) and tokens[i].kind == _PUNCT and tokens[i].text == text


def _is_root(tokens: list[_Token], i: int) -> bool:
    """An identifier that names a variable: not a field (``x.name``) and not a function (``name(``)."""
    return not _punct(tokens, i - 1, ".") and not _punct(tokens, i + 1, "(")


def _bound_names(tokens: list[_Token]) -> set[str]:
    """Names bound by comprehension macros: the ``x`` of ``list.exists(x, ...)`` (and ``k, v`` forms)."""
    bound: set[str] = set()
    count = len(tokens)
    for i in range(1, count - 1):
        if not (_punct(tokens, i - 1, ".") and tokens[i].kind == _IDENT and tokens[i].text in _BINDING_MACROS):
            continue
        if not _punct(tokens, i + 1, "("):
            continue
        j = i + 2
        while j + 1 < count and tokens[j].kind == _IDENT and _punct(tokens, j + 1, ","):
            bound.add(tokens[j].text)
            j += 2
    return bound


# Usage: which parts of the variables an expression reads ---------------------------------------------------


@dataclass(slots=True)
class _Reads:
    """One node of a usage tree: read whole, or only the listed keys (each with its own node)."""

    whole: bool = False
    keys: dict[str, _Reads] = field(default_factory=dict)

    def child(self, key: str) -> _Reads:
        node = self.keys.get(key)
        if node is None:
            node = self.keys[key] = _Reads()
        return node

    def merge(self, other: _Reads) -> None:
        if other.whole:
            self.whole = True
        if self.whole:
            self.keys.clear()
            return
        for key, node in other.keys.items():
            self.child(key).merge(node)

    def project(self, value: Any) -> Any:
        """The part of ``value`` this node reads; maps lose only keys no expression can observe."""
        if self.whole or not isinstance(value, Mapping):
            return value
        return {key: node.project(value[key]) for key, node in self.keys.items() if key in value}


def _usage_of(tokens: list[_Token], roots: Collection[str]) -> dict[str, _Reads]:
    """Follow each variable through literal selections (``.name``, ``['key']``); it is read whole where the
    chain ends (an operator, a method call, a computed index, ``in``, ``size(...)``...)."""
    usage: dict[str, _Reads] = {}
    count = len(tokens)
    for i, token in enumerate(tokens):
        if token.kind != _IDENT or token.text not in roots or not _is_root(tokens, i):
            continue
        node = usage.setdefault(token.text, _Reads())
        j = i + 1
        while j + 1 < count:
            key = tokens[j + 1]
            if _punct(tokens, j, ".") and key.kind == _IDENT and not _punct(tokens, j + 2, "("):
                node, j = node.child(key.text), j + 2
            elif _punct(tokens, j, "[") and key.kind == _STRING and key.plain and _punct(tokens, j + 2, "]"):
                node, j = node.child(key.text), j + 3
            else:
                break
        node.whole = True
    for node in usage.values():
        _normalise(node)  # a node read whole drops the keys recorded below it
    return usage


def _normalise(node: _Reads) -> None:
    if node.whole:
        node.keys.clear()
        return
    for child in node.keys.values():
        _normalise(child)


class Usage:
    """What a group of expressions reads from the activation; builds the one ``cel.Context`` they share.

    ``context`` converts only the variables the group references, each pruned to the keys it can observe.
    """

    __slots__ = ("_reads",)

    def __init__(self, reads: Mapping[str, _Reads]) -> None:
        self._reads = dict(reads)

    @classmethod
    def of(cls, expressions: Iterable[Expression]) -> Usage:
        merged: dict[str, _Reads] = {}
        for expression in expressions:
            for root, node in expression.reads.items():
                merged.setdefault(root, _Reads()).merge(node)
        for node in merged.values():
            _normalise(node)
        return cls(merged)

    @property
    def variables(self) -> frozenset[str]:
        """The variables at least one expression references."""
        return frozenset(self._reads)

    def context(self, activation: Mapping[str, Any]) -> _cel.Context:
        """A context holding the read parts of ``activation``; a missing variable is left undefined (an
        expression reading it fails, which policies treat as a deny). Raises ``CelEvaluationError`` if a
        value cannot be handed to the engine."""
        context = _cel.Context()
        for name in self._reads:
            if name in activation:
                self.bind(context, name, activation[name])
        return context

    def bind(self, context: _cel.Context, name: str, value: Any) -> None:
        """Set (or replace) one variable in ``context``, pruned like ``context`` does; unread names are skipped."""
        node = self._reads.get(name)
        if node is None:
            return
        try:
            context.add_variable(name, node.project(value))
        except Exception as exc:  # the engine raises ValueError/TypeError/OverflowError for unconvertible values
            raise CelEvaluationError(f"variable {name!r} cannot be converted: {exc}") from exc


class CelEvaluationError(Exception):
    """Evaluation failed (missing key, type mismatch, unconvertible value...). Never escapes to a response."""


# Compiled expressions --------------------------------------------------------------------------------------


class Expression:
    """One compiled expression and what it reads; immutable, shared by every request."""

    __slots__ = ("_failures", "_program", "field", "reads", "source", "variables")

    def __init__(self, source: str, field: str, program: _cel.Program, reads: Mapping[str, _Reads]) -> None:
        self.source = source
        self.field = field
        self._program = program
        self.reads = reads
        self.variables = frozenset(reads)
        self._failures: set[str] = set()

    def __repr__(self) -> str:
        return f"Expression({self.field}: {self.source!r})"

    def observes(self, path: Sequence[str]) -> bool:
        """Whether the value at ``path`` (``("mcp", "tool", "arguments")``) can change this expression's
        result: it reads that part, something inside it, or a map holding it whole. Config-time only."""
        node = self.reads.get(path[0]) if path else None
        for key in path[1:]:
            if node is None or node.whole:
                break
            node = node.keys.get(key)
        return node is not None

    def evaluate(self, context: _cel.Context) -> Any:
        """The expression's value; raises ``CelEvaluationError``."""
        try:
            return self._program.execute(context)
        except Exception as exc:  # KeyError, TypeError, RuntimeError, ValueError, ZeroDivisionError...
            raise CelEvaluationError(f"{type(exc).__name__}: {exc}") from exc

    def holds(self, context: _cel.Context) -> bool | None:
        """True or False; None (logged) if evaluation failed or the value is not a bool."""
        try:
            value = self._program.execute(context)
        except Exception as exc:
            self.failed(f"{type(exc).__name__}: {exc}")
            return None
        if value is True or value is False:
            return value
        self.failed(f"result is {type(value).__name__}, not bool")
        return None

    def failed(self, reason: str) -> None:
        """Log an evaluation failure: each distinct one at warning once, repeats at debug."""
        if reason in self._failures or len(self._failures) >= _LOGGED_FAILURES:
            log.debug("cel evaluation failed", field=self.field, expression=self.source, reason=reason)
            return
        self._failures.add(reason)
        log.warning("cel evaluation failed", field=self.field, expression=self.source, reason=reason)


def compile_expression(
    source: str, field: str, *, policy: str | None = None, variables: Collection[str] = VARIABLES
) -> Expression:
    """Compile ``source`` for ``field`` of ``policy``; raises ``CelCompileError`` if it does not parse, names a
    variable outside ``variables`` or calls a function the engine does not define."""

    def error(reason: str, line: int | None = None, column: int | None = None) -> CelCompileError:
        return CelCompileError(field, str(source), reason, line, column, policy)

    if not isinstance(source, str) or not source.strip():
        raise error("empty expression")
    try:
        program = _cel.compile(source)
    except Exception as exc:  # ValueError for syntax; anything else is the parser refusing the text too
        match = _PARSE_POSITION.search(str(exc))
        if match is None:
            raise error(str(exc)) from None
        raise error(match.group(3), int(match.group(1)), int(match.group(2))) from None
    tokens = _lex(source)
    referenced = set(program.variables())
    bound = _bound_names(tokens) if tokens is not None else referenced - set(variables) - _BUILTIN_NAMES
    unknown = sorted(referenced - set(variables) - _BUILTIN_NAMES - bound)
    if unknown:
        known = ", ".join(variables)
        raise error(
            f"unknown variable {unknown[0]!r} (known: {known})", *_locate(source, tokens, unknown[0], call=False)
        )
    functions = sorted(f for f in program.functions() if _IDENTIFIER.match(f) and f not in KNOWN_FUNCTIONS)
    if functions:
        raise error(f"unknown function {functions[0]!r}", *_locate(source, tokens, functions[0], call=True))
    header = _mixed_case_header(source, tokens)
    if header is not None:
        key, line, column = header
        raise error(f"header names are lower-case in request.headers: use {key.lower()!r}", line, column)
    roots = [name for name in variables if name in referenced]
    reads = _usage_of(tokens, roots) if tokens is not None else {}
    # Anything the lexer could not follow is read whole, so pruning never hides what an expression reads.
    for name in roots:
        reads.setdefault(name, _Reads(whole=True))
    return Expression(source, field, program, reads)


def _locate(source: str, tokens: list[_Token] | None, name: str, *, call: bool) -> tuple[int | None, int | None]:
    """Where ``name`` first appears as a variable (or, with ``call``, as a function or method being called)."""
    tokens = tokens or []
    for i, token in enumerate(tokens):
        if token.kind != _IDENT or token.text != name:
            continue
        is_call = _punct(tokens, i + 1, "(")
        if (call and is_call) or (not call and _is_root(tokens, i)):
            return _position(source, token.offset)
    return None, None


def _mixed_case_header(source: str, tokens: list[_Token] | None) -> tuple[str, int, int] | None:
    """A ``request.headers['X-Tenant']`` key (with its position): it could never match a lower-case name."""
    tokens = tokens or []
    for i in range(2, len(tokens) - 2):
        key = tokens[i + 2]
        if (
            tokens[i].text == "headers"
            and _punct(tokens, i - 1, ".")
            and tokens[i - 2].kind == _IDENT
            and tokens[i - 2].text == "request"
            and _punct(tokens, i + 1, "[")
            and key.kind == _STRING
            and key.text != key.text.lower()
        ):
            return (key.text, *_position(source, key.offset))
    return None


__all__ = [
    "KNOWN_FUNCTIONS",
    "VARIABLES",
    "CelCompileError",
    "CelEvaluationError",
    "Expression",
    "Usage",
    "compile_expression",
]
