"""Search and the audit page's model.

Search takes one identifier and finds what it names, in this order: a backend event id (its
receipt), a session, a patient (a pool was granted or shared to them), a doctor (registered),
a payment reference (its pool, shown on the owner's page). Each is one key lookup of an
aggregate (the ids are derived from the names: ledger/domain.py `create_id`), no scan.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ledger.domain import Pool
from legacy.log import legacy_log_exists
from ledger.errors import LedgerError
from ledger.input_rules import id_problem

KINDS = ("any", "event", "session", "patient", "doctor", "payment")


def _path(*parts: str) -> str:
    return "/console/" + "/".join(quote(p, safe="") for p in parts)


def search(ledger: Any, text: str, kind: str = "any") -> tuple[list[dict], str | None]:
    """(matches, problem): each match {"kind", "id", "label", "href"}; `problem` says why the
    text cannot be an identifier (ledger/input_rules.py), else None."""
    text = text.strip()
    problem = id_problem(text) if text else "type an identifier"
    if problem:
        return [], problem
    wanted = KINDS[1:] if kind not in KINDS[1:] else (kind,)
    found = []
    for name in wanted:
        match = _FINDERS[name](ledger, text)
        if match is not None:
            found.append(match)
    return found, None


def _event(ledger: Any, text: str) -> dict | None:
    receipt = ledger.get_receipt(text)
    if receipt is None:
        return None
    return {"kind": "event", "id": text, "label": f"backend event {text} ({receipt.event_type})",
            "href": _path("events", text)}


def _session(ledger: Any, text: str) -> dict | None:
    try:
        session = ledger.get_session(text)
    except LedgerError:
        return None
    return {"kind": "session", "id": text,
            "label": f"{session.kind} session {text} ({session.state})",
            "href": _path("sessions", text)}


def _patient(ledger: Any, text: str) -> dict | None:
    if not ledger.knows_patient(text):
        return None
    return {"kind": "patient", "id": text, "label": f"patient {text}",
            "href": _path("patients", text)}


def _doctor(ledger: Any, text: str) -> dict | None:
    if not ledger.knows_doctor(text):
        return None
    return {"kind": "doctor", "id": text, "label": f"doctor {text}",
            "href": _path("doctors", text)}


def _payment(ledger: Any, text: str) -> dict | None:
    pool = ledger.load(Pool.create_id(text))
    if not isinstance(pool, Pool):
        return None
    return {"kind": "payment", "id": text,
            "label": f"payment {text}: pool of patient {pool.owner_id}",
            "href": _path("patients", pool.owner_id) + f"#pool-{pool.id}"}


_FINDERS = {"event": _event, "session": _session, "patient": _patient, "doctor": _doctor,
            "payment": _payment}


def event_page(ledger: Any, event_id: str) -> dict | None:
    """A backend event's receipt: its type, when it was recorded, its result, and links to
    what its result names; None for an unknown event id."""
    receipt = ledger.get_receipt(event_id)
    if receipt is None:
        return None
    result = dict(receipt.result or {})
    links = []
    for key, page in (("session_id", "sessions"), ("patient_id", "patients"),
                      ("doctor_id", "doctors"), ("owner_id", "patients")):
        if isinstance(result.get(key), str):
            links.append({"label": f"{page[:-1]} {result[key]}",
                          "href": _path(page, result[key])})
    return {"event_id": event_id, "type": receipt.event_type,
            "recorded_at": receipt.created_on, "result": result, "links": links}


# -------------------------------------------------------------------------------- audit


def audit_page(state: Any) -> dict:
    """The chains' digest, the projections' and the audit followers' lag (events behind the
    log's head), and whether a legacy history was imported."""
    from api.audit_routes import get_digest

    digest = get_digest("auditor", state.audit) if state.audit is not None else None
    head = int(state.ledger.recorder.max_notification_id() or 0)
    chains = [{"chain": name, **value} for name, value in (digest or {}).items()
              if isinstance(value, dict)]
    return {"digest": digest, "chains": chains, "head": head,
            "projection_lag": state.projector.lag() if state.projector is not None else {},
            "audit_lag": state.audit.lag() if state.audit is not None else {},
            "legacy": legacy_log_exists(state.settings.database_url)}
