"""The sampling decision (pure): the spec's built-in samplers over our incoming context.

The gateway decides itself instead of asking the SDK's sampler, so a request that is not sampled
never reaches the SDK (no span object, no attribute dict): only ids to propagate. The ratio rule is
the SDK's TraceIdRatioBased one (the low 64 bits of the trace id below ratio * 2^64), so services
with the same ratio agree on the same traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from dataplane.observability.settings import SamplerKind

_LOW_64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Sampling:
    """A compiled sampler."""

    kind: SamplerKind
    ratio: float = 1.0
    parent_based: bool = field(init=False)
    # The root rule: always (bound 2^64), never (0), or trace id ratio.
    bound: int = field(init=False)

    def __post_init__(self) -> None:
        kind = SamplerKind(self.kind)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "parent_based", kind.value.startswith("parentbased_"))
        if kind in (SamplerKind.ALWAYS_ON, SamplerKind.PARENT_BASED_ALWAYS_ON):
            bound = 1 << 64
        elif kind in (SamplerKind.ALWAYS_OFF, SamplerKind.PARENT_BASED_ALWAYS_OFF):
            bound = 0
        else:
            bound = round(self.ratio * (1 << 64))
        object.__setattr__(self, "bound", bound)

    def decide(self, trace_id: int, parent_sampled: bool | None) -> bool:
        """Sample a request of `trace_id` whose caller decided `parent_sampled` (None: no caller
        decision: a root, or B3 that deferred it)?"""
        if self.parent_based and parent_sampled is not None:
            return parent_sampled
        return (trace_id & _LOW_64) < self.bound
