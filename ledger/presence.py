"""Call presence from provider reports: when a call connected and when it ended.

Rules: billing-rules.md §8 (a departure ends the call only if the participant has not rejoined
within 60 seconds; then `ended_at` is the departure) and issue 4 §3 (Connected when both the
patient and the doctor are in the room, at the later join; Ended at the earlier of the first
participant leaving for good and the room ending). Signals are ordered by the provider's
timestamp, never by arrival, so the outcome of a set of signals does not depend on the order in
which they were delivered. Pure: no clock is read; `as_of` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

REJOIN_SECONDS = 60  # billing-rules.md §8
ROLES = ("patient", "doctor")
ACTIONS = ("joined", "left", "room_ended")
_ORDER = {"joined": 0, "left": 1, "room_ended": 2}  # a same-second rejoin counts as no gap


@dataclass(frozen=True)
class Signal:
    """One provider report: `role` is patient|doctor ("" for room_ended); `at` is UTC seconds."""

    at: datetime
    role: str
    action: str

    def sort_key(self) -> tuple:
        return (self.at, _ORDER[self.action], self.role)


@dataclass(frozen=True)
class Presence:
    """What the signals say: all instants are provider timestamps (UTC).

    `connected_at`: first instant both were in the room. `ended_at`/`end_reason`: the end the
    reports point to (`participant_left`: a departure not followed by that participant's rejoin
    among the reports; `room_ended`). `decide_at`: the instant from which that end can no
    longer be undone by a report (departure + 60 s; the room's end) — the tick records it then
    (plus the skew allowance), so reports delivered late or out of order until then still count.
    `both_present`: both in the room after the last report (the call is not idle).
    """

    connected_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    decide_at: datetime | None = None
    both_present: bool = False


def derive(signals: list[Signal], rejoin_seconds: int = REJOIN_SECONDS) -> Presence:
    """Fold signals in provider-time order into a Presence (see module doc)."""
    rejoin = timedelta(seconds=rejoin_seconds)
    inside = {role: 0 for role in ROLES}
    left_at: dict[str, datetime] = {}  # role -> departure not yet followed by a rejoin
    connected_at = None
    for signal in sorted(signals, key=Signal.sort_key):
        gone = [t for t in left_at.values() if signal.at > t + rejoin]
        if gone:  # the earliest pending departure's window closes first
            return _departed(connected_at, min(gone), rejoin)
        if signal.action == "room_ended":
            if left_at:  # nobody can rejoin an ended room
                return _departed(connected_at, min(left_at.values()), rejoin)
            return Presence(connected_at, signal.at, "room_ended", signal.at)
        step = 1 if signal.action == "joined" else -1
        inside[signal.role] = max(0, inside[signal.role] + step)
        if connected_at is None and all(inside.values()):
            connected_at = signal.at
        if connected_at is not None:
            if inside[signal.role]:
                left_at.pop(signal.role, None)  # back within the rejoin window
            else:
                left_at.setdefault(signal.role, signal.at)
    if left_at:
        return _departed(connected_at, min(left_at.values()), rejoin)
    return Presence(connected_at, both_present=all(inside.values()))


def _departed(connected_at: datetime | None, departure: datetime, rejoin: timedelta) -> Presence:
    return Presence(connected_at, departure, "participant_left", departure + rejoin)
