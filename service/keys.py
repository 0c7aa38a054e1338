"""Redis key names. One model's keys share the hash tag ``{model}`` (one Redis Cluster slot)."""

from __future__ import annotations

__all__ = ["samples_stream", "dead_letter_stream", "dead_letter_counts", "lease_key",
           "CONSUMER_GROUP", "prediction_key", "labelled_key", "pending_predictions",
           "served_totals", "served_window", "ingest_request"]

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


def prediction_key(model: str, prediction_id: str) -> str:
    """A served prediction awaiting its label (a hash with a TTL): ``np:{model}:pred:{id}``."""
    return f"np:{{{model}}}:pred:{prediction_id}"


def labelled_key(model: str, prediction_id: str) -> str:
    """Tombstone of a prediction already labelled (its stream entry ID; expires like it)."""
    return f"np:{{{model}}}:labelled:{prediction_id}"


def pending_predictions(model: str) -> str:
    """Ids awaiting a label, scored by their expiry in ms (a sorted set swept for expiries)."""
    return f"np:{{{model}}}:pending"


def served_totals(model: str) -> str:
    """Model-wide served-prediction accuracy counters (a hash shared by every API replica)."""
    return f"np:{{{model}}}:served"


def served_window(model: str) -> str:
    """The most recent labelled predictions' scores (a capped list, newest first)."""
    return f"np:{{{model}}}:served:window"


def ingest_request(model: str, key_digest: str) -> str:
    """What one ``Idempotency-Key`` wrote (body digest and entry IDs; expires):
    ``np:{model}:ingest:{sha256 of the key}``."""
    return f"np:{{{model}}}:ingest:{key_digest}"
