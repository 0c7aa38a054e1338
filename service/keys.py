"""Redis key names. One model's keys share the hash tag ``{model}`` (one Redis Cluster slot)."""

from __future__ import annotations

__all__ = ["samples_stream", "dead_letter_stream", "dead_letter_counts", "lease_key",
           "CONSUMER_GROUP"]

#: The consumer group the model's trainer reads with (XREADGROUP); one group per model stream.
CONSUMER_GROUP = "trainer"


def samples_stream(model: str) -> str:
    """The training stream producers XADD to: ``np:{model}:samples``."""
    return f"np:{{{model}}}:samples"


def dead_letter_stream(model: str) -> str:
    """Malformed entries with their reason: ``np:{model}:dead``."""
    return f"np:{{{model}}}:dead"


def dead_letter_counts(model: str) -> str:
    """Dead letters so far, by reason (a hash), updated in the same transaction as the XADD."""
    return f"np:{{{model}}}:dead:counts"


def lease_key(model: str) -> str:
    """Which worker trains the model (a lease with a TTL, renewed while alive)."""
    return f"np:{{{model}}}:lease"
