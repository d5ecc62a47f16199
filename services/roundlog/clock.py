"""The only place roundlog reads the wall clock; everything else gets time from events."""

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Now, aware UTC, truncated to the millisecond that Avro ``timestamp-millis`` keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)
