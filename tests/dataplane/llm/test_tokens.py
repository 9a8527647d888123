# ruff: noqa: E501, RUF001  (sample texts are data, kept whole and as written)
"""The token estimate against exact encoder counts: the samples below were counted with o200k_base and
cl100k_base (the `bpe-openai` package, which bundles both, installed outside the project for the
measurement; recorded here so the test needs no tokenizer). The bounds are those tokens.py documents."""

from __future__ import annotations

import json

import pytest

from dataplane.llm.tokens import (
    MESSAGE_OVERHEAD,
    REPLY_PRIMING,
    TextTokenCounter,
    estimate_input_tokens,
    estimate_tokens,
    estimated_usage,
)

# name: (text, o200k_base tokens, cl100k_base tokens)
SAMPLES: dict[str, tuple[str, int, int]] = {
    "english": (
        "The gateway sits between agents and the models they call. It keeps provider keys away from\nagents, counts the tokens every namespace spends, and moves traffic to another provider when one\nfails. Operators read one access-log line per request with the model, the provider, input and output\ntokens and the time to the first token. Budgets are checked before a request and charged after it.",
        78,
        78,
    ),
    "english_chat": (
        "Hello! Can you tell me what the weather will be like in Paris tomorrow? I'm planning a picnic with my family and we'd like to know whether to bring umbrellas.",
        33,
        36,
    ),
    "python": (
        'def route_model(settings, model, health=None, operation="chat"):\n    """The tries for `model`; None when no provider serves it."""\n    every = candidates(settings, model, operation)\n    if not every:\n        return None\n    now = health.now()\n    available = tuple(a for a in every if health.available(a.provider.name, now))\n    return ModelRoute(model, available)\n',
        80,
        80,
    ),
    "json": (
        '{"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}, "units": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}',
        54,
        53,
    ),
    "yaml": (
        "apiVersion: agentgate.dev/v1alpha1\nkind: Backend\nmetadata: {name: models, namespace: default}\nspec:\n  llm:\n    providers:\n    - name: openai\n      type: openai\n      apiKeyRef: {name: llm-keys, key: openai}\n",
        66,
        64,
    ),
    "german": (
        "Die Verkehrsinfrastruktur der Bundesrepublik wurde im vergangenen Jahrzehnt umfassend modernisiert, wobei Schienenverbindungen zwischen den Großstädten besondere Aufmerksamkeit erhielten.",
        34,
        54,
    ),
    "french": (
        "Le passage à l'échelle d'une passerelle nécessite une attention particulière à la latence, à la mémoire et à la façon dont les connexions sont réutilisées entre les requêtes.",
        39,
        45,
    ),
    "chinese": (
        "网关位于智能体和它们调用的模型之间。它让智能体无需持有提供商的密钥，统计每个命名空间消耗的令牌，并在某个提供商出现故障时将流量转移到另一个提供商。",
        59,
        83,
    ),
    "japanese": ("ゲートウェイはエージェントとモデルの間に位置し、プロバイダーのキーを安全に保管します。", 30, 39),
    "numbers": (
        "Invoice 2024-10-21: 3 items at 19.99, 1 item at 1249.50, total 1309.47; order id 88213409, customer 55102.",
        47,
        47,
    ),
    "log": (
        "2026-12-06T05:59:01.123Z INFO request method=POST path=/v1/chat/completions status=200 duration_ms=412 model=gpt-4o provider=openai input_tokens=1532 output_tokens=211",
        53,
        53,
    ),
    "short": ("hi", 1, 1),
    "markdown": (
        "## Results\n\n| model | p50 | p99 |\n|---|---|---|\n| gpt-4o | 412 ms | 1.9 s |\n| claude-sonnet-4-5 | 388 ms | 2.1 s |\n\n- Streams start faster through the gateway than expected.\n- **Note:** numbers drift between runs.\n",
        75,
        76,
    ),
}


def relative_errors(column: int) -> dict[str, float]:
    return {name: (estimate_tokens(text) - row[column]) / row[column] for name, (text, *row) in SAMPLES.items()}


def test_error_against_o200k_stays_within_the_documented_bounds() -> None:
    errors = relative_errors(0)
    assert sum(abs(e) for e in errors.values()) / len(errors) <= 0.09
    assert all(-0.18 <= e <= 0.26 for e in errors.values()), errors


def test_error_against_cl100k_stays_within_the_documented_bounds() -> None:
    errors = relative_errors(1)
    assert sum(abs(e) for e in errors.values()) / len(errors) <= 0.13
    assert all(-0.40 <= e <= 0.26 for e in errors.values()), errors


def test_the_estimate_beats_bytes_over_four() -> None:
    estimate = sum(abs(e) for e in relative_errors(0).values())
    naive = sum(abs(max(1, -(-len(text.encode()) // 4)) - o200k) / o200k for text, o200k, _ in SAMPLES.values())
    assert estimate < naive / 2


def test_empty_and_tiny_texts() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == estimate_tokens(" ") == 1


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_streamed_text_counts_like_the_whole_text(name: str) -> None:
    text = SAMPLES[name][0]
    counter = TextTokenCounter()
    for start in range(0, len(text), 7):
        counter.feed(text[start : start + 7])
    # Pieces split across feeds are counted once joined; only the last piece is held.
    assert counter.total() == estimate_tokens(text)


def test_streamed_counter_holds_a_bounded_piece() -> None:
    counter = TextTokenCounter()
    for _ in range(100):
        counter.feed("x" * 100)
    assert len(counter._pending) <= 1024
    # A run longer than the bound is counted in bounded parts: at most one token more per part.
    assert 0 <= counter.total() - estimate_tokens("x" * 10_000) <= 10_000 // 1024 + 1


def test_request_input_estimates_count_framing_system_and_tools() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    openai_body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
        ],
        "tools": [tool],
    }
    expected = REPLY_PRIMING + 2 * MESSAGE_OVERHEAD + estimate_tokens("Be brief.") + estimate_tokens("hello there")
    expected += estimate_tokens(json.dumps([tool], separators=(",", ":")))
    assert estimate_input_tokens("openai", openai_body) == expected
    anthropic_body = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "hello there"}]}
    assert estimate_input_tokens("anthropic", anthropic_body) == (
        REPLY_PRIMING + MESSAGE_OVERHEAD + estimate_tokens("Be brief.") + estimate_tokens("hello there")
    )
    assert estimated_usage(10, 5).total_tokens == 15
