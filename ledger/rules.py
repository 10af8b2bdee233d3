"""Pure billing rules: units owed, blocks, deadlines. Source: billing-rules.md §1, §2, §3, §8.

Every function here is a pure function of event times (timezone-aware UTC datetimes truncated to
whole seconds) and a Policy; nothing reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

BLOCK_SECONDS = 600  # one unit pays one 600-second block (§1); fixed, not configuration
CALL_GRACE_SECONDS = 60  # a call under a minute is free (§2); fixed
KINDS = ("text", "voice", "video")
BUCKETS = KINDS


@dataclass(frozen=True)
class Policy:
    """Configurable timings, all in seconds. Defaults are billing-rules.md §3 and §8."""

    skew_seconds: int = 60
    settlement_grace_seconds: int = 600
    text_not_started_seconds: int = 900
    doctor_reply_seconds: int = 300
    ring_timeout_seconds: int = 90
    text_idle_seconds: int = 600
    call_idle_seconds: int = 900
    max_duration_seconds: int = 3 * 3600

    def __post_init__(self) -> None:
        # A block boundary is acted on at boundary + skew; settlement must come after that
        # so that every full block is charged by the tick before the session settles.
        if not 0 <= self.skew_seconds <= self.settlement_grace_seconds:
            raise ValueError("skew_seconds must be within [0, settlement_grace_seconds]")
        if self.max_duration_seconds < BLOCK_SECONDS:
            raise ValueError("max_duration_seconds must be at least one block")

    def idle_seconds(self, kind: str) -> int:
        """Idle timeout for a session kind: text 600 s, calls 900 s (§8)."""
        return self.text_idle_seconds if kind == "text" else self.call_idle_seconds

    @property
    def max_blocks(self) -> int:
        """Upper bound on blocks in one session: ceil(max duration / 600)."""
        return -(-self.max_duration_seconds // BLOCK_SECONDS)


def utc_seconds(moment: datetime) -> datetime:
    """Normalise an aware datetime to UTC truncated to whole seconds (§ preamble).

    Raises ValueError for a naive datetime: an instant without a zone is ambiguous.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(timezone.utc).replace(microsecond=0)


def bucket_for(kind: str) -> str:
    """The bucket a session kind consumes: text→text, voice→voice, video→video (§1)."""
    if kind not in KINDS:
        raise ValueError(f"unknown session kind {kind!r}")
    return kind


def presence_group(kind: str) -> str:
    """Live-session exclusivity group: voice and video count as one kind (§8)."""
    return "text" if kind == "text" else "call"


def billable_seconds(start: datetime, ended_at: datetime) -> int:
    """Billable duration d = max(0, ended_at − start), in whole seconds (§1)."""
    return max(0, int((ended_at - start).total_seconds()))


def units_owed(kind: str, start: datetime | None, ended_at: datetime) -> int:
    """Units owed by one session (§2).

    text: max(1, ceil(d/600)) once activated; calls: 0 under 60 s, else ceil(d/600);
    never started: 0.
    """
    if start is None:
        return 0
    d = billable_seconds(start, ended_at)
    blocks = -(-d // BLOCK_SECONDS)
    if kind == "text":
        return max(1, blocks)
    return 0 if d < CALL_GRACE_SECONDS else blocks


def block_end(start: datetime, n: int) -> datetime:
    """End of block n (n ≥ 0): start + n·600 s. Block n covers [block_end(n−1), block_end(n))."""
    return start + timedelta(seconds=n * BLOCK_SECONDS)


def settlement_due(ended_at: datetime, end_received_at: datetime, policy: Policy) -> datetime:
    """Settlement is due at max(ended_at, receipt of first Ended) + grace (§3)."""
    return max(ended_at, end_received_at) + timedelta(seconds=policy.settlement_grace_seconds)
