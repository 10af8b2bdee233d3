"""The console's pages under `/console` (HTML, not part of the OpenAPI document).

Every page but the sign-in form needs a console session (console/signin.py); without one a
GET is redirected (303) to `/console/login?next=<path>`. Pages read only; the handlers are
plain `def` (the ledger is synchronous; FastAPI runs them in its thread pool). A LedgerError
from the read side (unknown account, as-of in the future, audit catching up …) is shown on
the page with the API's status and code. Responses carry `Cache-Control: no-store` and a
content security policy that allows no script but the console's own file.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from console import accounts, format as fmt, lookup, signin
from console.legacy import legacy_page
from console.timeline import session_page
from ledger.errors import LedgerError
from ledger.input_rules import id_problem
from ledger.rules import BUCKETS

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
fmt.register(templates.env)
templates.env.globals["BUCKETS"] = BUCKETS

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(prefix="/console", include_in_schema=False)


def install(app: FastAPI) -> None:
    """Mount the console on `app` (built by api/app.py: `app.state.settings`, `api_keys`)."""
    settings = app.state.settings
    keys = app.state.api_keys
    app.state.console_signer = signin.Signer(
        signin.console_secret(settings, keys), keys,
        secure=bool(getattr(settings, "console_cookie_secure", True)))
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")),
              name="console-static")


# ---------------------------------------------------------------------------- rendering


def page(request: Request, template: str, status: int = 200, role: str | None = None,
         **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(request, template, {"role": role, **context},
                                          status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def problem_page(request: Request, role: str | None, status: int, title: str, detail: str,
                 code: str | None = None) -> HTMLResponse:
    return page(request, "problem.html", status=status, role=role, title=title,
                detail=detail, code=code)


def error_page(request: Request, role: str | None, exc: LedgerError) -> HTMLResponse:
    return problem_page(request, role, exc.status, exc.title, str(exc), exc.code)


def role_or_redirect(request: Request) -> str | Response:
    """The signed-in console role, or a redirect to the sign-in form."""
    role = request.app.state.console_signer.role_of_cookie(request.cookies.get(signin.COOKIE))
    if role is not None:
        request.scope.setdefault("state", {})["role"] = role  # the request's log line
        return role
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/console/login?next={quote(target, safe='')}", status_code=303)


def _instant(value: str | None, name: str) -> datetime | None:
    try:
        return fmt.parse_instant(value)
    except ValueError:
        raise _BadInput(f"{name} {value!r} is not a date and time (YYYY-MM-DDTHH:MM[:SS], UTC)")


class _BadInput(Exception):
    pass


# ------------------------------------------------------------------------------ sign in


@router.get("")
def console_root() -> Response:
    return RedirectResponse("/console/", status_code=307)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    if request.app.state.console_signer.role_of_cookie(request.cookies.get(signin.COOKIE)):
        return RedirectResponse(signin.safe_next(next), status_code=303)
    return page(request, "login.html", next=signin.safe_next(next), error=None)


@router.post("/login")
def login(request: Request, api_key: Annotated[str, Form(max_length=512)] = "",
          next: Annotated[str, Form(max_length=2000)] = "/console/") -> Response:
    """Sign in with an auditor or admin API key: 303 to `next` with the session cookie, or
    the form again with 401; 403 when the post does not come from this host's page."""
    if not signin.same_origin(request):
        return problem_page(request, None, 403, "Cross-site request refused",
                            "Sign in from the console's own page.", "forbidden")
    signer = request.app.state.console_signer
    if signer.role_for_key(api_key) is None:
        response = page(request, "login.html", status=401, next=signin.safe_next(next),
                        error="That key is not an auditor or admin API key.")
        response.headers["WWW-Authenticate"] = 'FormBased realm="ledger console"'
        return response
    response = RedirectResponse(signin.safe_next(next), status_code=303)
    signer.set_cookie(response, api_key)
    response.headers.update(SECURITY_HEADERS)
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if not signin.same_origin(request):
        return problem_page(request, None, 403, "Cross-site request refused",
                            "Sign out from the console's own page.", "forbidden")
    response = RedirectResponse("/console/login", status_code=303)
    request.app.state.console_signer.clear_cookie(response)
    return response


# ------------------------------------------------------------------------------- search


@router.get("/")
def home(request: Request) -> Response:
    role = role_or_redirect(request)
    if isinstance(role, Response):
        return role
    return page(request, "search.html", role=role, q="", kind="any", kinds=lookup.KINDS,
                matches=None, problem=None)


@router.get("/search")
def search(request: Request, q: Annotated[str, Query(max_length=400)] = "",
           kind: str = "any") -> Response:
    """One match: 303 to its page; otherwise the matches (or none) listed."""
    role = role_or_redirect(request)
    if isinstance(role, Response):
        return role
    matches, problem = lookup.search(request.app.state.ledger, q, kind)
    if len(matches) == 1:
        return RedirectResponse(matches[0]["href"], status_code=303)
    return page(request, "search.html", role=role, q=q, kind=kind, kinds=lookup.KINDS,
                matches=matches, problem=problem, status=200 if matches else 404)


# ---------------------------------------------------------------------------- the pages


def _reader_of(request: Request, value: str, what: str) -> str | Response:
    """The signed-in role, or the Response to answer instead: the sign-in redirect, or a 404
    page when `value` is not a valid id of a `what` (ledger/input_rules.py)."""
    role = role_or_redirect(request)
    if isinstance(role, Response):
        return role
    problem = id_problem(value)
    if problem:
        return problem_page(request, role, 404, f"No such {what}", f"{value!r}: {problem}",
                            "not_found")
    return role


@router.get("/sessions/{session_id}")
def session(request: Request, session_id: str) -> Response:
    role = _reader_of(request, session_id, "session")
    if isinstance(role, Response):
        return role
    try:
        model = session_page(request.app.state.ledger, session_id)
    except LedgerError as exc:
        return error_page(request, role, exc)
    return page(request, "session.html", role=role, s=model.resource, rows=model.rows,
                refs=model.references, pic=model.picture)


def _period(request: Request, as_of: str | None, start: str | None,
            end: str | None) -> accounts.Period:
    return accounts.period(request, _instant(as_of, "as of"), _instant(start, "from"),
                           _instant(end, "to"))


@router.get("/patients/{patient_id}")
def patient(request: Request, patient_id: str, as_of: str | None = None,
            start: Annotated[str | None, Query(alias="from")] = None,
            end: Annotated[str | None, Query(alias="to")] = None) -> Response:
    return _account_page(request, "patient", patient_id, (as_of, start, end),
                         accounts.patient_page)


@router.get("/doctors/{doctor_id}")
def doctor(request: Request, doctor_id: str, as_of: str | None = None,
           start: Annotated[str | None, Query(alias="from")] = None,
           end: Annotated[str | None, Query(alias="to")] = None) -> Response:
    return _account_page(request, "doctor", doctor_id, (as_of, start, end),
                         accounts.doctor_page)


def _account_page(request: Request, kind: str, account_id: str,
                  instants: tuple[str | None, str | None, str | None], build) -> Response:
    """A patient's or doctor's page (`kind`): `build(request, role, id, period)` gives its
    model; a malformed instant answers 422, the API's refusals their own page."""
    role = _reader_of(request, account_id, kind)
    if isinstance(role, Response):
        return role
    try:
        when = _period(request, *instants)
        model = build(request, role, account_id, when)
    except _BadInput as exc:
        return problem_page(request, role, 422, "Not a date and time", str(exc),
                            "validation_error")
    except LedgerError as exc:
        return error_page(request, role, exc)
    return page(request, f"{kind}.html", role=role, when=when, **{f"{kind}_id": account_id},
                **model)


@router.get("/events/{event_id}")
def backend_event(request: Request, event_id: str) -> Response:
    role = _reader_of(request, event_id, "event")
    if isinstance(role, Response):
        return role
    model = lookup.event_page(request.app.state.ledger, event_id)
    if model is None:
        return problem_page(request, role, 404, "No such event",
                            f"no backend event {event_id!r} was accepted", "not_found")
    return page(request, "event.html", role=role, e=model)


@router.get("/audit")
def audit(request: Request) -> Response:
    role = role_or_redirect(request)
    if isinstance(role, Response):
        return role
    try:
        model = lookup.audit_page(request.app.state)
    except LedgerError as exc:
        return error_page(request, role, exc)
    return page(request, "audit.html", role=role, a=model)


@router.get("/legacy")
def legacy(request: Request) -> Response:
    """The reconciliation of the imported legacy history by bug class, with its items."""
    role = role_or_redirect(request)
    if isinstance(role, Response):
        return role
    return page(request, "legacy.html", role=role, r=legacy_page(request.app.state))
