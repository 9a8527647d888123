"""The embedded config source: Kubernetes-style YAML files in a folder, watched for changes.

A bad edit never takes down what is being served. For every object identity (kind,
namespace, name) the source keeps the last version that validated:
- an invalid object is reported and its previous valid version stays in use;
- a file that is not valid YAML is reported (file, line) and every object it held stays;
- a deleted file removes its objects; an object defined twice is reported naming both files,
  and the first definition (in path order) wins.

Objects without `metadata.generation` get one the way Kubernetes assigns it: 1 when first
seen, plus one each time their spec (or data) changes, so status observedGeneration moves.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import yaml
from watchfiles._rust_notify import RustNotify  # documented "Rust backend direct usage" API

from controlplane.model import ConfigError, KubeObject, ObjectKey, SourceRef, object_from_manifest, validate
from shared.logging import get_logger

log = get_logger("controlplane.sources.folder")

YAML_SUFFIXES = (".yaml", ".yml")
# How long the watcher thread blocks before returning to the event loop. It bounds how long a
# cancelled watch() takes to stop (the thread cannot be interrupted), at the cost of a few
# idle wake-ups per second.
WAKE_INTERVAL_MS = 250

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class FolderState:
    """Every object in use (sorted by identity) and every problem of the latest load."""

    objects: tuple[KubeObject, ...]
    errors: tuple[ConfigError, ...]


@dataclass(frozen=True, slots=True)
class _Document:
    obj: KubeObject | None
    errors: tuple[ConfigError, ...]
    # The identity named by the document even when it could not be built (for "keep last good").
    key: ObjectKey | None
    explicit_generation: bool


@dataclass(frozen=True, slots=True)
class _ParsedFile:
    documents: tuple[_Document, ...]
    syntax_error: ConfigError | None


@dataclass(frozen=True, slots=True)
class _Candidate:
    obj: KubeObject
    file: str
    document: int


class FolderSource:
    """Reads every *.yaml / *.yml below `root` (recursively, hidden entries skipped).

    `load()` is synchronous and not thread-safe: call it from one place at a time (`watch()`
    runs it in a worker thread).
    """

    def __init__(self, root: Path, *, debounce_ms: int = 50, step_ms: int = 20, force_polling: bool = False) -> None:
        self.root = Path(root)
        self._debounce_ms = debounce_ms
        self._step_ms = step_ms
        self._force_polling = force_polling
        self._current: dict[ObjectKey, _Candidate] = {}
        self._file_keys: dict[str, tuple[ObjectKey, ...]] = {}
        self._parsed: dict[str, tuple[bytes, _ParsedFile]] = {}

    # --- loading ----------------------------------------------------------------------------

    def load(self) -> FolderState:
        """Read the folder now and merge it with the last good state."""
        if not self.root.is_dir():
            error = ConfigError(file=str(self.root), message="config folder does not exist; keeping the last objects")
            return FolderState(tuple(c.obj for _, c in sorted(self._current.items())), (error,))
        errors: list[ConfigError] = []
        candidates: list[_Candidate] = []
        file_keys: dict[str, tuple[ObjectKey, ...]] = {}
        seen_files: set[str] = set()
        for path in self._yaml_files():
            display = str(path)
            seen_files.add(display)
            parsed = self._read(path, display)
            if parsed.syntax_error is not None:
                errors.append(parsed.syntax_error)
                kept = [self._current[key] for key in self._file_keys.get(display, ()) if key in self._current]
                candidates.extend(kept)
                file_keys[display] = tuple(c.obj.key for c in kept)
                continue
            keys: list[ObjectKey] = []
            for index, document in enumerate(parsed.documents):
                candidate = self._merge(document, display, index, errors)
                if candidate is not None:
                    candidates.append(candidate)
                    keys.append(candidate.obj.key)
            file_keys[display] = tuple(keys)
        for stale in set(self._parsed) - seen_files:
            del self._parsed[stale]

        current: dict[ObjectKey, _Candidate] = {}
        for candidate in candidates:
            key = candidate.obj.key
            first = current.get(key)
            if first is None:
                current[key] = candidate
                continue
            errors.append(
                replace(
                    candidate.obj.error(
                        "metadata.name",
                        f"{key} is also defined in {first.file} (document {first.document + 1}); "
                        "this definition is ignored",
                    ),
                    file=candidate.file,
                )
            )
        self._current = current
        self._file_keys = file_keys
        for error in errors:
            log.debug("config error", error=str(error))
        return FolderState(tuple(c.obj for _, c in sorted(current.items())), tuple(errors))

    def _merge(self, document: _Document, file: str, index: int, errors: list[ConfigError]) -> _Candidate | None:
        """The object a document contributes: itself when valid, else the last good version."""
        problems = list(document.errors)
        if document.obj is not None and not problems:
            problems = validate(document.obj)
        previous = self._current.get(document.key) if document.key is not None else None
        if problems:
            errors.extend(problems)
            return previous
        obj = document.obj
        if obj is None:
            return None  # not one of our kinds
        if not document.explicit_generation and previous is not None:
            changed = _content(previous.obj) != _content(obj)
            obj = replace(obj, generation=previous.obj.generation + (1 if changed else 0))
        return _Candidate(obj, file, index)

    def _yaml_files(self) -> list[Path]:
        found: list[Path] = []
        for directory, subdirectories, files in os.walk(self.root):
            # Hidden entries include Kubernetes ConfigMap volumes' "..data" twins of every file.
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            found.extend(
                Path(directory, name) for name in files if name.endswith(YAML_SUFFIXES) and not name.startswith(".")
            )
        return sorted(found)

    def _read(self, path: Path, display: str) -> _ParsedFile:
        try:
            content = path.read_bytes()
        except OSError as exc:
            return _ParsedFile((), ConfigError(file=display, message=f"cannot read file: {exc.strerror or exc}"))
        cached = self._parsed.get(display)
        if cached is not None and cached[0] == content:
            return cached[1]
        parsed = _parse_file(display, content)
        self._parsed[display] = (content, parsed)
        return parsed

    # --- watching ---------------------------------------------------------------------------

    async def watch(self) -> AsyncIterator[FolderState]:
        """Yield the current state, then a new one after every change that alters it.

        The file watcher is running before the first state is read, so no edit made after
        that state was produced can be missed. Closing the generator stops the watcher at
        once; cancelling a pending `__anext__` takes up to WAKE_INTERVAL_MS.
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"config folder {self.root} does not exist or is not a folder")
        with RustNotify([str(self.root)], False, self._force_polling, 100, True, False) as notify:
            state = await anyio.to_thread.run_sync(self.load)
            yield state
            while True:
                changes = await anyio.to_thread.run_sync(
                    notify.watch, self._debounce_ms, self._step_ms, WAKE_INTERVAL_MS, None
                )
                if isinstance(changes, str):
                    continue  # "timeout" (or a signal seen by the thread): wait again
                if not any(may_change_state(path) for _, path in changes):
                    continue
                new_state = await anyio.to_thread.run_sync(self.load)
                if new_state != state:
                    state = new_state
                    log.info("config folder changed", objects=len(state.objects), errors=len(state.errors))
                    yield state


def _parse_file(display: str, content: bytes) -> _ParsedFile:
    """Decode a multi-document YAML file into objects; a syntax error fails the whole file."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _ParsedFile((), ConfigError(file=display, message=f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
    loader = _Loader(text)
    documents: list[_Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node) if node is not None else None
            line = node.start_mark.line + 1 if node is not None else 0
            documents.append(_document(data, SourceRef(display, len(documents), line)))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "syntax error"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        return _ParsedFile(
            (),
            ConfigError(
                file=display,
                line=mark.line + 1 if mark else 0,
                column=mark.column + 1 if mark else 0,
                message=f"invalid YAML: {problem}",
            ),
        )
    except yaml.YAMLError as exc:
        return _ParsedFile((), ConfigError(file=display, message=f"invalid YAML: {exc}"))
    finally:
        loader.dispose()
    return _ParsedFile(tuple(documents), None)


def _document(data: Any, source: SourceRef) -> _Document:
    obj, errors = object_from_manifest(data, source)
    if obj is None and not errors:
        if data is not None:
            kind = data.get("kind") if isinstance(data, Mapping) else None
            log.debug(
                "document ignored: not an object of a handled kind",
                file=source.path,
                document=source.document,
                kind=kind,
            )
        return _Document(None, (), None, False)
    key = obj.key if obj is not None else _key_from_errors(errors)
    metadata = data.get("metadata") if isinstance(data, Mapping) else None
    explicit = isinstance(metadata, Mapping) and "generation" in metadata
    return _Document(obj, tuple(errors), key, explicit)


def _key_from_errors(errors: list[ConfigError]) -> ObjectKey | None:
    first = errors[0]
    return ObjectKey(first.kind, first.namespace, first.name) if first.kind and first.name else None


def _content(obj: KubeObject) -> tuple[Any, ...]:
    """What Kubernetes bumps metadata.generation for: the spec (data for Secrets/ConfigMaps)."""
    return (obj.spec, obj.data, obj.string_data, obj.secret_type)


def may_change_state(path: str) -> bool:
    """Whether a changed path can alter the state: YAML files, directories, ConfigMap volume swaps."""
    name = os.path.basename(path)
    if name.startswith(".."):
        return True
    _, dot, suffix = name.lstrip(".").rpartition(".")
    return not dot or f".{suffix.lower()}" in YAML_SUFFIXES
