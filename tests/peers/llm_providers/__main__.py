"""One provider stand-in in its own process, for benches and manual runs (tests use ``serve_openai`` &c.):

    .venv/bin/python -m tests.peers.llm_providers openai --port 8300 --key sk-bench [--reuse-port]

It answers unscripted, so every request gets the default answer (the echo of the last user message,
word-count usage): the same request always gets the same reply. Requests are not recorded, so memory
stays flat under load. ``GET /`` answers 200 ``ok`` (no provider API lives there) so that proxies and
scripts can check readiness without a key. Once the socket listens it prints one line:
``llm stand-in <provider> listening on http://127.0.0.1:<port>``. ``--reuse-port`` lets several
processes share the port (SO_REUSEPORT), as the benches' lean responders do.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

import anyio
import anyio.abc

from ._http import HttpReply, RecordedRequest, _connection_loop
from .standins import AnthropicStandIn, AzureOpenAIStandIn, OpenAIStandIn, ProviderStandIn

STAND_INS: dict[str, Callable[[str], ProviderStandIn]] = {
    "openai": lambda key: OpenAIStandIn(key),
    "anthropic": lambda key: AnthropicStandIn(key),
    "azure": lambda key: AzureOpenAIStandIn(key),
}
_HEALTHY = HttpReply(200, [("content-type", "text/plain")], b"ok\n")


async def serve(peer: ProviderStandIn, port: int, reuse_port: bool) -> None:
    """Serve ``peer`` on 127.0.0.1:``port`` (0: any) until the process is stopped."""

    async def handle(request: RecordedRequest) -> HttpReply:
        if request.method == "GET" and request.path == "/":
            return _HEALTHY
        reply = await peer._handle(request)
        while peer.errors:  # a stand-in bug answered 500; say so where the operator looks
            print(f"stand-in failure: {peer.errors.pop()!r}", file=sys.stderr, flush=True)
        return reply

    def forget(_request: RecordedRequest) -> None:
        """Nothing is recorded: a bench sends hundreds of thousands of requests."""

    async def connection(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await _connection_loop(stream, handle, forget)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port, reuse_port=reuse_port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    print(f"llm stand-in {peer.provider} listening on http://127.0.0.1:{bound}", flush=True)
    async with listener:
        await listener.serve(connection)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.peers.llm_providers", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("provider", choices=sorted(STAND_INS))
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--key", required=True, help="the API key the stand-in accepts")
    parser.add_argument("--reuse-port", action="store_true", help="share the port with other processes")
    args = parser.parse_args()
    peer = STAND_INS[args.provider](args.key)
    try:
        import uvloop  # noqa: F401  (faster when installed; the answers are the same)

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a manual run quietly
        anyio.run(serve, peer, args.port, args.reuse_port, backend="asyncio", backend_options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
