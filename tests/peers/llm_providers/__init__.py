"""LLM provider stand-ins: real HTTP servers on 127.0.0.1 that speak OpenAI's, Anthropic's and Azure
OpenAI's wire formats (checked against the official SDKs in tests/peers/test_llm_providers.py), for
tests of the gateway's LLM routes. No real provider can be reached from here.

    async with serve_openai() as openai_peer, serve_anthropic() as anthropic_peer:
        client = openai.AsyncOpenAI(base_url=openai_peer.url, api_key=openai_peer.api_key)
        openai_peer.script(Reply(text="hi", usage=Usage(3, 1)))   # else: "echo: <last user text>"
        openai_peer.fail_next(2, 429, retry_after=0.01)            # then the provider's error bodies
        openai_peer.cut_next(after_events=3)                       # close mid-stream
        hold = openai_peer.hold_next()                             # await hold.reached.wait(); hold.release()
        openai_peer.last_request.headers["authorization"]          # what the gateway sent upstream

Defaults: the answer echoes the last user message (``echo: <text>``), ``model`` echoes the requested
model (Azure: the deployment's model), ids and ``created`` come from a per-server counter, usage counts
words. Knobs queue up and each is taken by one request (see ``standins`` for the order)."""

from ._http import RecordedRequest
from .script import Hold, Reply, ToolCall, Usage, count_tokens
from .standins import (
    AnthropicStandIn,
    AzureOpenAIStandIn,
    OpenAIStandIn,
    ProviderStandIn,
    serve_anthropic,
    serve_azure_openai,
    serve_openai,
)

__all__ = [
    "AnthropicStandIn",
    "AzureOpenAIStandIn",
    "Hold",
    "OpenAIStandIn",
    "ProviderStandIn",
    "RecordedRequest",
    "Reply",
    "ToolCall",
    "Usage",
    "count_tokens",
    "serve_anthropic",
    "serve_azure_openai",
    "serve_openai",
]
