"""A notes MCP server over stdio, written with the official `mcp` SDK.

Tools: `add_note`, `list_notes`, `search_notes`. Every note is also a resource
(`note://<id>`, listed by resources/list and readable through the `note://{note_id}`
template), and the `review_notes` prompt hands the notes to a model to summarise.

A stdio server talks to one client, so agentgate starts one process per MCP session: notes
live in that process unless NOTES_FILE names a JSON file, which makes them outlive the
session (written atomically after each change). Only MCP messages go to stdout; nothing
else prints there.

    .venv/bin/python examples/mcp-servers/notes_server.py          # speaks MCP on stdin/stdout
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import MCPServer, UserMessage
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.resources import FunctionResource
from pydantic import BaseModel, Field, TypeAdapter

MAX_NOTES = 10_000
URI_PREFIX = "note://"


class Note(BaseModel):
    """One note; `id` is stable for the life of the store."""

    id: int
    title: str
    body: str
    tags: list[str] = Field(default_factory=list)
    created: str

    @property
    def uri(self) -> str:
        return f"{URI_PREFIX}{self.id}"

    def as_markdown(self) -> str:
        tags = f"\n\ntags: {', '.join(self.tags)}" if self.tags else ""
        return f"# {self.title}\n\n{self.body}{tags}\n"


class NoteList(BaseModel):
    """A tool result: the matching notes, newest first."""

    notes: list[Note]


_NOTES_JSON = TypeAdapter(list[Note])


class NoteBook:
    """The notes of one server process (pure: no MCP here), optionally backed by a JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._notes: dict[int, Note] = {}
        if path is not None and path.exists():
            for note in _NOTES_JSON.validate_json(path.read_bytes()):
                self._notes[note.id] = note

    def add(self, title: str, body: str, tags: Iterable[str] = ()) -> Note:
        if len(self._notes) >= MAX_NOTES:
            raise ValueError(f"the notebook is full ({MAX_NOTES} notes)")
        clean_tags = sorted({tag.strip().lower() for tag in tags if tag.strip()})
        note = Note(
            id=max(self._notes, default=0) + 1,
            title=title.strip(),
            body=body,
            tags=clean_tags,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._notes[note.id] = note
        self._save()
        return note

    def get(self, note_id: int) -> Note | None:
        return self._notes.get(note_id)

    def all(self, tag: str | None = None) -> list[Note]:
        wanted = tag.strip().lower() if tag else None
        notes = (n for n in self._notes.values() if wanted is None or wanted in n.tags)
        return sorted(notes, key=lambda n: n.id, reverse=True)

    def search(self, query: str) -> list[Note]:
        """Notes whose title, body or tags contain every word of `query` (case-insensitive)."""
        words = query.lower().split()
        return [
            note
            for note in self.all()
            if all(word in f"{note.title}\n{note.body}\n{' '.join(note.tags)}".lower() for word in words)
        ]

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(_NOTES_JSON.dump_json(list(self._notes.values()), indent=2))
        tmp.replace(self.path)


def build_server(notebook: NoteBook) -> MCPServer:
    server = MCPServer(
        "notes",
        instructions="A small notebook: add notes with add_note, find them with search_notes; "
        "each note is also the resource note://<id>.",
        version="1.0.0",
        log_level="WARNING",
    )

    def publish(note: Note) -> None:
        """Make `note` a listed resource (resources/list), read lazily from the notebook."""

        def read() -> str:
            current = notebook.get(note.id)
            return current.as_markdown() if current is not None else ""

        server.add_resource(
            FunctionResource(
                uri=note.uri, name=f"note-{note.id}", title=note.title, mime_type="text/markdown", fn=read
            )
        )

    @server.tool()
    def add_note(
        title: Annotated[str, Field(min_length=1, max_length=200, description="A short title")],
        body: Annotated[str, Field(max_length=20_000, description="The note text (Markdown)")],
        tags: Annotated[list[str] | None, Field(max_length=16, description="Optional tags, e.g. ['todo']")] = None,
    ) -> Note:
        """Add a note; returns it with its id and resource URI note://<id>."""
        try:
            note = notebook.add(title, body, tags or ())
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        publish(note)
        return note

    @server.tool()
    def list_notes(tag: Annotated[str | None, Field(description="Only notes with this tag")] = None) -> NoteList:
        """List notes, newest first, optionally only those with a tag."""
        return NoteList(notes=notebook.all(tag))

    @server.tool()
    def search_notes(query: Annotated[str, Field(min_length=1, max_length=200)]) -> NoteList:
        """Find notes containing every word of the query (title, body or tags; case-insensitive)."""
        return NoteList(notes=notebook.search(query))

    @server.resource("note://{note_id}", name="note", mime_type="text/markdown")
    def read_note(note_id: str) -> str:
        """One note as Markdown."""
        note = notebook.get(int(note_id)) if note_id.isdigit() else None
        if note is None:
            raise ResourceNotFoundError(f"no note {note_id!r}")
        return note.as_markdown()

    @server.prompt()
    def review_notes(tag: str = "") -> list[UserMessage]:
        """Ask the model to summarise the notes (optionally those with one tag) and list open tasks."""
        notes = notebook.all(tag or None)
        text = "\n\n".join(n.as_markdown() for n in notes) or "(no notes yet)"
        scope = f" tagged {tag!r}" if tag else ""
        return [UserMessage(f"Here are my notes{scope}. Summarise them and list any open tasks.\n\n{text}")]

    for note in notebook.all():
        publish(note)
    return server


def main() -> None:
    store = os.environ.get("NOTES_FILE")
    build_server(NoteBook(Path(store) if store else None)).run("stdio")


if __name__ == "__main__":
    main()
