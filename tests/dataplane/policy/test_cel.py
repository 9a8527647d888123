"""CEL expressions: compile-time errors that name the field and position, fail-closed evaluation, and pruning
the variables to what expressions read without ever changing a result."""

from __future__ import annotations

from typing import Any

import cel
import pytest
from structlog.testing import capture_logs

from dataplane.policy.cel import (
    KNOWN_FUNCTIONS,
    CelCompileError,
    CelEvaluationError,
    Usage,
    compile_expression,
)

FIELD = "authorization.allow[0]"

CLAIMS = {"sub": "alice", "tenant": "t1", "groups": ["eng", "ops"], "aud": ["gw"], "exp": 2000000000, "a b": "x"}
ACTIVATION: dict[str, Any] = {
    "jwt": CLAIMS,
    "request": {
        "method": "POST",
        "path": "/mcp",
        "host": "gw",
        "headers": {"x-tenant": "t1", "authorization": "Bearer x", "accept": "*/*", "x-team": "eng"},
    },
    "source": {"address": "10.0.0.1", "identity": "alice", "namespace": "", "serviceAccount": ""},
    "mcp": {
        "method": "tools/call",
        "tool": {"name": "search", "target": "github", "arguments": {"q": "cel", "limit": 3}},
        "prompt": {"name": "", "target": ""},
        "resource": {"uri": "", "target": ""},
    },
    "a2a": {"method": "", "operation": "", "target": {"name": "", "namespace": ""}},
    "llm": {"model": "gpt-4o"},
}


def context_for(source: str, activation: dict[str, Any] = ACTIVATION) -> cel.Context:
    return Usage.of([compile_expression(source, FIELD)]).context(activation)


# Compile-time errors ------------------------------------------------------------------------------------------


def test_a_syntax_error_names_the_field_and_the_position() -> None:
    with pytest.raises(CelCompileError) as caught:
        compile_expression("jwt.sub == 'a' &&\n  ", FIELD, policy="tenant-rbac")
    error = caught.value
    assert (error.policy, error.field, error.line) == ("tenant-rbac", FIELD, 2)
    assert error.column is not None and error.column >= 1
    assert "Syntax error" in error.reason
    assert str(error).startswith("policy 'tenant-rbac' authorization.allow[0]: Syntax error")


def test_an_unknown_variable_is_refused_at_its_position() -> None:
    with pytest.raises(CelCompileError) as caught:
        compile_expression("jwt.sub == 'a' &&\n  tenant == 'b'", FIELD)
    error = caught.value
    assert (error.line, error.column) == (2, 3)
    assert error.reason.startswith("unknown variable 'tenant'")
    assert "2:3" in str(error)


def test_an_unknown_function_is_refused_at_its_position() -> None:
    with pytest.raises(CelCompileError) as caught:
        compile_expression("jwt.sub.lowerAscii() == 'alice'", FIELD)
    assert (caught.value.reason, caught.value.line, caught.value.column) == ("unknown function 'lowerAscii'", 1, 9)


def test_a_mixed_case_header_key_is_refused_because_it_could_never_match() -> None:
    with pytest.raises(CelCompileError) as caught:
        compile_expression("request.headers['X-Tenant'] == 't1'", FIELD)
    assert "use 'x-tenant'" in caught.value.reason
    assert (caught.value.line, caught.value.column) == (1, 17)


@pytest.mark.parametrize("source", ["", "   "])
def test_an_empty_expression_is_refused(source: str) -> None:
    with pytest.raises(CelCompileError, match="empty expression"):
        compile_expression(source, FIELD)


@pytest.mark.parametrize(
    "source",
    [
        "jwt.groups.exists(g, g == 'eng')",
        "jwt.groups.all(g, g.startsWith('e') || g == 'ops')",
        "[1, 2].map(x, x * 2).size() == 2",
        "type(jwt.sub) == string && type(1) == int",
        "optional.of(1).hasValue()",
        "timestamp('2030-01-01T00:00:00Z').getFullYear() == 2030",
    ],
)
def test_macro_bindings_type_names_and_builtins_are_not_unknown(source: str) -> None:
    expression = compile_expression(source, FIELD)
    assert expression.holds(context_for(source)) is True


def test_variables_can_be_restricted_per_use() -> None:
    with pytest.raises(CelCompileError, match="unknown variable 'mcp'"):
        compile_expression("mcp.tool.name == 'x'", "limits.key", variables=("jwt", "source"))


# Evaluation -------------------------------------------------------------------------------------------------------


def test_holds_answers_true_and_false() -> None:
    assert compile_expression("jwt.tenant == 't1'", FIELD).holds(context_for("jwt.tenant == 't1'")) is True
    assert compile_expression("jwt.tenant == 't2'", FIELD).holds(context_for("jwt.tenant == 't2'")) is False


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("jwt.missing == 'x'", "KeyError"),
        ("request.headers['x-none'] == 'x'", "KeyError"),
        ("jwt.exp / 0 > 1", "ZeroDivisionError"),
        ("jwt.sub", "result is str, not bool"),
        ("jwt.exp + 'x' == 1", "Error"),
    ],
)
def test_a_failed_or_non_bool_evaluation_is_none_and_logged_once(source: str, reason: str) -> None:
    expression = compile_expression(source, FIELD)
    context = context_for(source)
    with capture_logs() as logs:
        assert expression.holds(context) is None
        assert expression.holds(context) is None
    assert [entry["log_level"] for entry in logs] == ["warning", "debug"]
    assert logs[0]["field"] == FIELD and reason in logs[0]["reason"]


def test_evaluate_returns_any_value_and_raises_a_typed_error() -> None:
    expression = compile_expression("jwt.groups", "limits.key")
    assert expression.evaluate(context_for("jwt.groups")) == ["eng", "ops"]
    with pytest.raises(CelEvaluationError, match="KeyError"):
        compile_expression("jwt.nope", FIELD).evaluate(context_for("jwt.nope"))


def test_an_unconvertible_value_is_a_typed_error_not_a_crash() -> None:
    usage = Usage.of([compile_expression("jwt.big == 1", FIELD)])
    with pytest.raises(CelEvaluationError, match="'jwt'"):
        usage.context({**ACTIVATION, "jwt": {"big": object()}})


# Pruning ----------------------------------------------------------------------------------------------------------


def test_only_the_read_parts_of_the_variables_reach_the_engine() -> None:
    source = "jwt.tenant == request.headers['x-tenant'] && mcp.tool.name in ['search']"
    seen = context_for(source).variables
    assert seen == {
        "jwt": {"tenant": "t1"},
        "request": {"headers": {"x-tenant": "t1"}},
        "mcp": {"tool": {"name": "search"}},
    }


def test_a_group_of_expressions_reads_the_union() -> None:
    usage = Usage.of(
        [compile_expression("jwt.sub == 'alice'", FIELD), compile_expression("size(jwt.groups) > 1", FIELD)]
    )
    assert usage.variables == {"jwt"}
    assert usage.context(ACTIVATION).variables == {"jwt": {"sub": "alice", "groups": ["eng", "ops"]}}


# Each expression is evaluated with the pruned context and with every variable whole: the same answer.
EQUIVALENT: list[tuple[str, bool | None]] = [
    ("jwt.tenant == request.headers['x-tenant']", True),
    ("has(jwt.tenant) && !has(jwt.nope)", True),
    ("has(jwt.nope)", False),
    ("size(jwt) == 6", True),
    ("jwt.exists(k, k == 'a b')", True),
    ("jwt.exists(k, k == 'zzz')", False),
    ("jwt['a b'] == 'x'", True),
    ("jwt[\"sub\"] == 'alice'", True),
    ("jwt['\\x61 b'] == 'x'", True),
    ("'x-team' in request.headers && size(request.headers) == 4", True),
    ("'x-other' in request.headers", False),
    ("request.headers.all(k, k.startsWith('x-') || k == 'accept' || k == 'authorization')", True),
    ("request.headers[jwt.groups[0] == 'eng' ? 'x-team' : 'accept'] == 'eng'", True),
    ("mcp.tool.arguments.limit == 3 && mcp.tool.arguments['q'] == 'cel'", True),
    ("mcp.tool == {'name': 'search', 'target': 'github', 'arguments': {'q': 'cel', 'limit': 3}}", True),
    ("mcp.tool.name in {'alice': ['search'], 'bob': []}[source.identity]", True),
    ("mcp.tool.name in {'bob': ['search'], 'alice': []}[source.identity]", False),
    ("jwt.sub.startsWith('a') // jwt.other in a comment\n && r'''jwt.x''' == 'jwt.x'", True),
    ("'jwt.tenant' == jwt.sub || \"request.headers\" == ''", False),
    ("[jwt].exists(j, j.sub == 'alice')", True),
    ("jwt.groups.filter(g, g != 'ops') == ['eng']", True),
    ("dyn(jwt).tenant == 't2'", False),
    ("llm.model.matches('^gpt-')", True),
    ("a2a.target.namespace == source.namespace", True),
    ("request.headers['x-none'] == 'x'", None),
    ("jwt.nope.deeper == 1", None),
]


@pytest.mark.parametrize(("source", "expected"), EQUIVALENT)
def test_pruning_never_changes_a_result(source: str, expected: bool | None) -> None:
    expression = compile_expression(source, FIELD)
    assert expression.holds(context_for(source)) is expected
    assert expression.holds(cel.Context(ACTIVATION)) is expected


# One call of every function the compile check accepts: all defined by the installed engine (an upgrade that drops
# one fails here, not at request time).
CALLS = [
    "size('ab') == 2",
    "'ab'.contains('a') && 'ab'.startsWith('a') && 'ab'.endsWith('b') && 'ab'.matches('^a')",
    "string(1) == '1' && bytes('a') == b'a' && double(1) == 1.0 && int('2') == 2 && uint(3) == 3u",
    "dyn(1) == 1 && type(1) == int && duration('1s') == duration('1000ms')",
    "timestamp('2030-01-02T03:04:05.006Z').getFullYear() == 2030",
    "timestamp('2030-01-02T03:04:05.006Z').getMonth() == 0 && timestamp('2030-01-02T03:04:05Z').getDate() == 2",
    "timestamp('2030-01-02T03:04:05Z').getDayOfYear() == 1 && timestamp('2030-01-02T03:04:05Z').getDayOfMonth() == 1",
    "timestamp('2030-01-02T03:04:05Z').getDayOfWeek() == 3 && timestamp('2030-01-02T03:04:05Z').getHours() == 3",
    "timestamp('2030-01-02T03:04:05.006Z').getMinutes() == 4 && duration('90s').getSeconds() == 90",
    "timestamp('2030-01-02T03:04:05.006Z').getMilliseconds() == 6",
    "optional.of(1).value() == 1 && optional.none().orValue(2) == 2 && !optional.ofNonZeroValue(0).hasValue()",
    "optional.none().or(optional.of(3)).value() == 3",
]


def test_every_known_function_is_defined_by_the_engine() -> None:
    named: set[str] = set()
    for source in CALLS:
        expression = compile_expression(source, FIELD)
        assert expression.holds(cel.Context()) is True, source
        named.update(cel.compile(source).functions())
    assert named >= KNOWN_FUNCTIONS
