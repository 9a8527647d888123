"""A2A Backends -> `A2aBackendSettings`, checked field by field.

Defaults are resolved and the base path normalized here, once per update, so the A2A handler
never re-validates configuration on the request path. The agent's endpoints are the Backend's
ordinary address Targets, compiled with every other HTTP backend's.
"""

from __future__ import annotations

from dataplane.config.errors import ErrorReporter
from dataplane.config.model import DEFAULT_A2A_MAX_REQUEST_BYTES, A2aBackendSettings, A2aSignedCards
from dataplane.config.validate import check_enum, check_path
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.config_rules import A2A_AGENT_NAME, A2A_AGENT_NAME_MAX_LENGTH, A2A_AGENT_NAME_RULE

__all__ = ["AGENT_NAME", "MAX_A2A_REQUEST_BYTES", "A2aBackendSettings", "agent_name_problem", "compile_a2a_settings"]

MAX_A2A_REQUEST_BYTES = 1 << 30
MAX_AGENT_NAME_LENGTH = A2A_AGENT_NAME_MAX_LENGTH
# The control plane checks agentName with the same rule (controlplane/model/validation.py
# A2A_AGENT_NAME): "namespace/name" or one name, at most one '/', so rules can split them.
AGENT_NAME = A2A_AGENT_NAME
_SIGNED_CARDS: dict[int, A2aSignedCards] = {
    pb.A2aBackend.SIGNED_CARDS_UNSPECIFIED: "strip",
    pb.A2aBackend.SIGNED_CARDS_STRIP: "strip",
    pb.A2aBackend.SIGNED_CARDS_PRESERVE: "preserve",
}


def agent_name_problem(name: str) -> str | None:
    """None if `name` can name an agent (rules, x-target-agent), else why not."""
    if len(name) > MAX_AGENT_NAME_LENGTH:
        return f"must be at most {MAX_AGENT_NAME_LENGTH} characters"
    if AGENT_NAME.fullmatch(name) is None:
        return f"invalid agent name {name!r}: {A2A_AGENT_NAME_RULE}"
    return None


def compile_a2a_settings(
    report: ErrorReporter, backend_name: str, settings: pb.A2aBackend
) -> A2aBackendSettings | None:
    """Compile `backend.a2a`; None (with every problem reported) when any field is invalid.

    An empty agent name means the backend's key; the control plane always sends one.
    """
    ok = True
    agent_name = settings.agent_name or backend_name
    problem = agent_name_problem(agent_name)
    if problem is not None:
        where = "" if settings.agent_name else f" (empty, so the backend name {backend_name!r} was used)"
        report("a2a.agent_name", problem + where)
        ok = False
    base_path = settings.base_path or "/"
    if check_path(report, "a2a.base_path", base_path):
        base_path = base_path.rstrip("/") or "/"
    else:
        ok = False
    max_request_bytes = settings.max_request_bytes or DEFAULT_A2A_MAX_REQUEST_BYTES
    if max_request_bytes > MAX_A2A_REQUEST_BYTES:
        report("a2a.max_request_bytes", f"{max_request_bytes} exceeds the limit of {MAX_A2A_REQUEST_BYTES}")
        ok = False
    signed_cards: A2aSignedCards = "strip"
    if check_enum(report, "a2a.signed_cards", settings, "signed_cards"):
        signed_cards = _SIGNED_CARDS[settings.signed_cards]
    else:
        ok = False
    if not ok:
        return None
    return A2aBackendSettings(
        agent_name=agent_name,
        base_path=base_path,
        max_request_bytes=max_request_bytes,
        signed_cards=signed_cards,
    )
