"""How names and resource URIs from N federated MCP targets are exposed to one client, and back.

Tool and prompt names (and resource-template names used by completion) carry the target as a prefix:

    <target>__<name>          e.g. "git-hub__create_issue", "fs__read.file"

Why a double underscore: MCP tool names SHOULD use ``[A-Za-z0-9_.-]``, 1-128 characters (2025-11-25, Tool
Names), but model APIs narrow that: Anthropic's accepts ``[a-zA-Z0-9_-]`` up to 128, OpenAI's the same set up
to 64. A separator outside that set (``.``, ``/``, ``:``) would make federated tools unusable by the models
that call them. ``__`` stays inside the set, and the
target-name rule makes it unambiguous: a target name is 1-63 characters of ``[A-Za-z0-9_-]``, starts and ends
with a letter or digit, and never contains ``__``. So the *first* ``__`` in an exposed name always ends the
target, whatever the tool name contains (``_``, ``-``, ``.``, even ``__``), and ``split(expose(t, n)) == (t, n)``.

Resource URIs carry the target in a URI of our own scheme, with the original URI kept verbatim after the
authority, so templates keep working (the client expands ``{var}`` inside the original part):

    file:///etc/hosts        ->  mcp-target://fs/file:///etc/hosts
    db://{table}/rows        ->  mcp-target://pg/db://{table}/rows

A target name cannot contain ``/``, so the first ``/`` after the authority ends the target and the rest is the
original URI, byte for byte.

Prefix modes: ``CONDITIONAL`` prefixes only when there is more than one target, ``ALWAYS`` always, ``NEVER``
never. Without prefixes, names and URIs pass through unchanged and the caller routes by an index built from
list results (see ``federation.py``); collisions there are resolved by target order, first target wins.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from shared.mcp_names import SEPARATOR, target_name_problem

URI_SCHEME = "mcp-target"
_URI_PREFIX = URI_SCHEME + "://"



class PrefixMode(enum.Enum):
    """When exposed names carry the target prefix."""

    CONDITIONAL = "conditional"
    ALWAYS = "always"
    NEVER = "never"


class TargetNameError(ValueError):
    """A configured target name cannot be used as a prefix; raised at config time, never per request."""


def check_target_name(name: str) -> str:
    """Return ``name`` if it is a valid target name, else raise ``TargetNameError`` saying why."""
    problem = target_name_problem(name)
    if problem is not None:
        raise TargetNameError(problem)
    return name


class Naming:
    """The compiled naming rule for one backend: built once from config, then pure lookups per message."""

    __slots__ = ("_target_set", "mode", "prefixed", "targets")

    def __init__(self, targets: Sequence[str], mode: PrefixMode = PrefixMode.CONDITIONAL) -> None:
        if not targets:
            raise TargetNameError("an MCP backend needs at least one target")
        for name in targets:
            check_target_name(name)
        if len(set(targets)) != len(targets):
            raise TargetNameError(f"duplicate MCP target names in {list(targets)!r}")
        self.targets: tuple[str, ...] = tuple(targets)
        self._target_set = frozenset(targets)
        self.mode = mode
        self.prefixed: bool = mode is PrefixMode.ALWAYS or (mode is PrefixMode.CONDITIONAL and len(targets) > 1)

    # Names (tools, prompts) -------------------------------------------------------------------------------

    def expose(self, target: str, name: str) -> str:
        """The name the client sees for ``name`` of ``target``."""
        return f"{target}{SEPARATOR}{name}" if self.prefixed else name

    def split(self, exposed: str) -> tuple[str, str] | None:
        """``(target, upstream name)`` for a prefixed name, or None if it names no configured target.

        Without prefixes this returns None: the caller must route through its name index instead.
        """
        if not self.prefixed:
            return None
        target, sep, name = exposed.partition(SEPARATOR)
        if not sep or not name or target not in self._target_set:
            return None
        return target, name

    # Resource URIs and URI templates ---------------------------------------------------------------------

    def expose_uri(self, target: str, uri: str) -> str:
        """The URI (or URI template) the client sees for ``uri`` of ``target``."""
        return f"{_URI_PREFIX}{target}/{uri}" if self.prefixed else uri

    def split_uri(self, exposed: str) -> tuple[str, str] | None:
        """``(target, original URI)`` for a rewritten URI, or None if it is not one of ours."""
        if not self.prefixed or not exposed.startswith(_URI_PREFIX):
            return None
        target, slash, uri = exposed[len(_URI_PREFIX) :].partition("/")
        if not slash or not uri or target not in self._target_set:
            return None
        return target, uri
