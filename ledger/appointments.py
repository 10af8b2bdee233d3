"""Appointments: bookings, never charges (billing-rules.md §9, I10; issue 3 §3).

An appointment's lifecycle is recorded as events — Booked, Confirmed, JoinWindowOpened (from 5
minutes before the start), Linked (to the session that serves it), Completed (when that session
settles), Cancelled, Expired, NoShow — and none of them touches a pool or a wallet: an appointment
linked to a session is billed only through that session's blocks. Legacy appointment billing
(legacy-system.md §3.4, paths A1–A8) exists only as imported legacy facts in the legacy log.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID, uuid5

from eventsourcing.domain import event

from ledger.errors import AppointmentClosed, InvalidTransition
from ledger.recording import LedgerAggregate

JOIN_WINDOW = timedelta(minutes=5)  # the join window opens 5 minutes before the start (§9)
CLOSED = ("completed", "cancelled", "expired", "no_show")
APPOINTMENT_KINDS = ("text", "voice", "video")


class Appointment(LedgerAggregate):
    """A booking. `status`: booked | confirmed | completed | cancelled | expired | no_show;
    `join_open` and `session_id` are recorded separately (a confirmed appointment may be linked
    before or after its join window opens)."""

    @staticmethod
    def create_id(appointment_id: str) -> UUID:
        from ledger.domain import NS

        return uuid5(NS, "appointment:" + appointment_id)

    @event("Booked")
    def __init__(self, appointment_id: str, patient_id: str, doctor_id: str, kind: str,
                 starts_at: datetime, duration_minutes: int, at: datetime) -> None:
        self.appointment_id = appointment_id
        self.patient_id = patient_id
        self.doctor_id = doctor_id
        self.kind = kind
        self.starts_at = starts_at
        self.duration_minutes = duration_minutes
        self.booked_at = at
        self.status = "booked"
        self.join_open = False
        self.session_id: str | None = None
        self.closed_at: datetime | None = None
        self.close_detail: dict = {}

    @property
    def closed(self) -> bool:
        return self.status in CLOSED

    def check_open(self, what: str) -> None:
        """Raise AppointmentClosed: nothing changes an appointment after it is closed."""
        if self.closed:
            raise AppointmentClosed(f"appointment {self.appointment_id} is {self.status}; "
                                    f"{what} does not apply")

    def confirm(self, at: datetime) -> None:
        self.check_open("confirmed")
        if self.status == "booked":
            self._confirmed(at=at)

    @event("Confirmed")
    def _confirmed(self, at: datetime) -> None:
        self.status = "confirmed"

    def open_join_window(self, at: datetime) -> None:
        """Raises InvalidTransition before starts_at − 5 min or before confirmation."""
        self.check_open("join_window_opened")
        if self.status != "confirmed":
            raise InvalidTransition("the join window opens only for a confirmed appointment")
        if at < self.starts_at - JOIN_WINDOW:
            raise InvalidTransition(f"the join window opens at "
                                    f"{(self.starts_at - JOIN_WINDOW).isoformat()}")
        if not self.join_open:
            self._join_window_opened(at=at)

    @event("JoinWindowOpened")
    def _join_window_opened(self, at: datetime) -> None:
        self.join_open = True

    def link(self, session_id: str, at: datetime) -> bool:
        """Link the serving session; False if already linked to it. Raises InvalidTransition
        for a second, different session."""
        self.check_open("linked")
        if self.session_id == session_id:
            return False
        if self.session_id is not None:
            raise InvalidTransition(f"appointment is linked to session {self.session_id!r}")
        self._linked(session_id=session_id, at=at)
        return True

    @event("Linked")
    def _linked(self, session_id: str, at: datetime) -> None:
        self.session_id = session_id

    def complete(self, session_id: str, at: datetime) -> None:
        """Its session settled (§9). Billing happened in the session, not here (I10)."""
        if not self.closed:
            self._closed(status="completed", at=at, detail={"session_id": session_id})

    def close(self, status: str, at: datetime, detail: dict, session_unbilled: bool = False) -> None:
        """cancelled | expired | no_show. Raises AppointmentClosed once closed, and
        InvalidTransition for a linked appointment unless its session settled without a
        billable start (`session_unbilled`): a started session completes it instead (§9)."""
        self.check_open(status)
        if self.session_id is not None and not session_unbilled:
            raise InvalidTransition(f"appointment is linked to session {self.session_id!r}: it is "
                                    f"completed when that session settles, or closed as {status} "
                                    "once it settles without a billable start")
        self._closed(status=status, at=at, detail=detail)

    @event("Closed")
    def _closed(self, status: str, at: datetime, detail: dict) -> None:
        self.status = status
        self.closed_at = at
        self.close_detail = detail

    def view(self) -> dict:
        """The appointment as the API returns it."""
        return {"appointment_id": self.appointment_id, "status": self.status,
                "patient_id": self.patient_id, "doctor_id": self.doctor_id, "kind": self.kind,
                "starts_at": self.starts_at.isoformat(), "join_open": self.join_open,
                "join_window_opens_at": (self.starts_at - JOIN_WINDOW).isoformat(),
                "session_id": self.session_id,
                "closed_at": self.closed_at.isoformat() if self.closed_at else None}
