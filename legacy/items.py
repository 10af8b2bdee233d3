"""One function per legacy table: a row (dict, ⚠ columns None when missing) → an item dict.

Each item has the fields of its `legacy.history` dataclass (the fold in `legacy.replay` builds
the dataclass from it); `plans` and `users` items are reference data. A row that cannot be
interpreted, or contradicts itself, raises `legacy.normalise.Rejected` (docs/legacy.md,
Rejects). Rules: legacy-system.md §1 (columns, statuses), §3.4 (appointment kinds), B30
(times), B31 (statuses the code writes outside the DB enums).
"""

from __future__ import annotations

from legacy.normalise import (APPOINTMENT_KINDS, BUCKET_COLUMNS, CALL_KINDS, Context, Rejected,
                              appointment_start, appointment_status, check_ended,
                              check_not_negative, check_order, check_role, country_code,
                              currency_of, documented_status, id_of, json_of, required_id,
                              status_of, to_int, to_minor, to_utc)


def plan_item(row: dict, ctx: Context) -> dict:
    """plans → {plan_id, name, category, max_members, currency, price, duration_days, granted}."""
    plan_id = required_id(row, "id")
    duration = to_int(row.get("duration"), "duration", 30)
    ctx.plan_days[plan_id] = duration
    return {"plan_id": plan_id, "name": row.get("name"), "category": row.get("category"),
            "max_members": to_int(row.get("max_members"), "max_members", 1),
            "currency": row.get("currency"), "price": to_int(row.get("price"), "price", 0),
            "duration_days": duration,
            "granted": {bucket: to_int(row.get(column), column, 0) for bucket, column in
                        (("text", "text_sessions"), ("voice", "voice_calls"),
                         ("video", "video_calls"))}}


def user_item(row: dict, ctx: Context) -> dict:
    """users → {user_id, user_type, country_legacy, country, currency}; doctors remembered."""
    user_id = required_id(row, "id")
    user_type = status_of(row.get("user_type"))
    country = row.get("country")
    ctx.user_types[user_id] = user_type
    if user_type == "doctor":
        ctx.doctor_currency[user_id] = currency_of(country)
    return {"user_id": user_id, "user_type": user_type, "country_legacy": country,
            "country": country_code(country), "currency": currency_of(country)}


def subscription_item(row: dict, ctx: Context) -> dict:
    """subscriptions → `Subscription` fields (counters per bucket)."""
    key = f"subscriptions:{required_id(row, 'id')}"
    granted, remaining = {}, {}
    for bucket, (total_column, remaining_column) in BUCKET_COLUMNS.items():
        granted[bucket] = to_int(row.get(total_column), total_column, 0)
        remaining[bucket] = to_int(row.get(remaining_column), remaining_column, 0)
    status = to_int(row.get("status"), "status")
    return {"key": key, "owner_id": required_id(row, "user_id"),
            "payment_reference": row.get("payment_transaction_id"),
            "plan_name": row.get("plan_name"),
            "plan_duration_days": ctx.plan_days.get(id_of(row.get("plan_id"))),
            "starts_at": to_utc(row.get("start_date"), "start_date"),
            "ends_at": to_utc(row.get("end_date"), "end_date"),
            "status": status, "is_active": bool(row.get("is_active")),
            "granted": granted, "remaining": remaining}


def member_item(row: dict, ctx: Context) -> dict:
    """subscription_members → `Member` fields."""
    return {"key": f"subscription_members:{required_id(row, 'id')}",
            "subscription_key": f"subscriptions:{required_id(row, 'subscription_id')}",
            "patient_id": required_id(row, "user_id"),
            "status": documented_status(row.get("status"), "subscription_members"),
            "role": status_of(row.get("role"))}


def payment_item(row: dict, ctx: Context) -> dict:
    """payment_transactions → `Payment` fields (⚠ user_id/metadata may be missing → None)."""
    amount = row.get("amount")
    metadata = json_of(row.get("metadata"))
    documented_status(row.get("status"), "payment_transactions")  # the admin's payment_status: any
    return {"key": f"payment_transactions:{required_id(row, 'id')}",
            "reference": row.get("transaction_id") or row.get("reference"),
            "amount_minor": None if amount is None else to_minor(amount),
            "currency": (row.get("currency") or "").strip() or None,
            "status": status_of(row.get("payment_status") or row.get("status")),
            "user_id": id_of(row.get("user_id") or metadata.get("user_id")),
            "plan_id": id_of(metadata.get("plan_id")),
            "created_at": to_utc(row.get("created_at"), "created_at"),
            "processed_at": to_utc(row.get("processed_at"), "processed_at"),
            "gateway_reference": row.get("gateway_reference")}


def appointment_item(row: dict, ctx: Context) -> dict:
    """appointments → `Appointment` fields. An unknown type bills the text counter, as the
    legacy deduction did ("other → text", §3.4)."""
    kind = APPOINTMENT_KINDS.get(status_of(row.get("appointment_type")), "text")
    session_id = id_of(row.get("session_id"))
    patient_id, doctor_id = _people(row, ctx)
    return {"key": f"appointments:{required_id(row, 'id')}",
            "patient_id": patient_id, "doctor_id": doctor_id, "kind": kind,
            "status": appointment_status(row.get("status")),
            "starts_at": appointment_start(row),
            "session_key": f"text_sessions:{session_id}" if session_id else None,
            "completed_at": to_utc(row.get("completed_at"), "completed_at"),
            "actual_start_time": to_utc(row.get("actual_start_time"), "actual_start_time"),
            "actual_end_time": to_utc(row.get("actual_end_time"), "actual_end_time"),
            "sessions_deducted": to_int(row.get("sessions_deducted"), "sessions_deducted"),
            "earnings_awarded_minor": None if row.get("earnings_awarded") is None
            else to_minor(row["earnings_awarded"], "earnings_awarded")}


def _people(row: dict, ctx: Context) -> tuple[str, str]:
    """(patient_id, doctor_id) of a row; Rejected when missing or naming another user type."""
    patient_id, doctor_id = required_id(row, "patient_id"), required_id(row, "doctor_id")
    check_role(ctx, patient_id, "patient", "patient_id")
    check_role(ctx, doctor_id, "doctor", "doctor_id")
    return patient_id, doctor_id


def _counters(row: dict) -> dict:
    """sessions_used and auto_deductions_processed (0 when null); Rejected when negative."""
    counters = {"sessions_used": to_int(row.get("sessions_used"), "sessions_used", 0),
                "auto_deductions_processed": to_int(row.get("auto_deductions_processed"),
                                                    "auto_deductions_processed", 0)}
    for column, value in counters.items():
        check_not_negative(value, column)
    return counters


def text_session_item(row: dict, ctx: Context) -> dict:
    """text_sessions → `TextSession` fields. Rejected: a status §1.4 does not list, `ended`
    without ended_at, activated before it started, ended before its start."""
    status = documented_status(row.get("status"), "text_sessions")
    started = to_utc(row.get("started_at"), "started_at")
    activated = to_utc(row.get("activated_at"), "activated_at")
    ended = to_utc(row.get("ended_at"), "ended_at")
    check_order(started, activated, "text session", "activated_at")
    check_order(activated or started, ended, "text session")
    check_ended(status, ended, "text session")
    patient_id, doctor_id = _people(row, ctx)
    appointment_id = id_of(row.get("appointment_id"))
    return {"key": f"text_sessions:{required_id(row, 'id')}",
            "patient_id": patient_id, "doctor_id": doctor_id,
            "status": status, "started_at": started,
            "activated_at": activated, "ended_at": ended,
            "last_activity_at": to_utc(row.get("last_activity_at"), "last_activity_at"),
            "doctor_response_deadline": to_utc(row.get("doctor_response_deadline"),
                                               "doctor_response_deadline"),
            **_counters(row),
            "sessions_remaining_before_start": to_int(
                row.get("sessions_remaining_before_start"), "sessions_remaining_before_start"),
            "appointment_key": f"appointments:{appointment_id}" if appointment_id else None,
            "reason": row.get("reason")}


def call_session_item(row: dict, ctx: Context) -> dict:
    """call_sessions → `CallSession` fields (⚠ manual_deduction_applied None when missing).
    Rejected: a call type or status §1.5 does not list, `ended` without ended_at, answered or
    connected before it started, ended before its start."""
    kind = CALL_KINDS.get(status_of(row.get("call_type")))
    if kind is None:
        raise Rejected(f"call_type {row.get('call_type')!r} is not voice, audio or video")
    status = documented_status(row.get("status"), "call_sessions")
    started = to_utc(row.get("started_at"), "started_at")
    answered = to_utc(row.get("answered_at"), "answered_at")
    connected = to_utc(row.get("connected_at"), "connected_at")
    ended = to_utc(row.get("ended_at"), "ended_at")
    check_order(started, connected, "call session", "connected_at")
    check_order(started, answered, "call session", "answered_at")
    check_order(connected or started, ended, "call session")
    check_ended(status, ended, "call session")
    patient_id, doctor_id = _people(row, ctx)
    routing = id_of(row.get("appointment_id"))
    applied = row.get("manual_deduction_applied")
    return {"key": f"call_sessions:{required_id(row, 'id')}",
            "patient_id": patient_id, "doctor_id": doctor_id, "call_type": kind,
            "status": status, "appointment_ref": routing,
            "appointment_key": f"appointments:{routing}" if routing and routing.isdigit()
            else None,
            "started_at": started, "answered_at": answered,
            "connected_at": connected, "ended_at": ended,
            "last_activity_at": to_utc(row.get("last_activity_at"), "last_activity_at"),
            "declined_at": to_utc(row.get("declined_at"), "declined_at"),
            "call_duration": to_int(row.get("call_duration"), "call_duration"),
            **_counters(row),
            "manual_deduction_applied": None if applied is None else bool(applied),
            "reason": row.get("reason") or row.get("failure_reason")}


def text_appointment_session_item(row: dict, ctx: Context) -> dict:
    """text_appointment_sessions (A6/A7) → `TextAppointmentSession` fields."""
    start = to_utc(row.get("start_time"), "start_time")
    ended = to_utc(row.get("ended_at"), "ended_at")
    check_order(start, ended, "text appointment session")
    appointment_id = id_of(row.get("appointment_id"))
    patient_id, doctor_id = required_id(row, "patient_id"), id_of(row.get("doctor_id"))
    check_role(ctx, patient_id, "patient", "patient_id")
    if doctor_id is not None:
        check_role(ctx, doctor_id, "doctor", "doctor_id")
    sessions_used = to_int(row.get("sessions_used"), "sessions_used", 0)
    check_not_negative(sessions_used, "sessions_used")
    return {"key": f"text_appointment_sessions:{required_id(row, 'id')}",
            "appointment_key": f"appointments:{appointment_id}" if appointment_id else None,
            "patient_id": patient_id, "doctor_id": doctor_id,
            "sessions_used": sessions_used,
            "is_ended": bool(row.get("is_ended")), "start_time": start, "ended_at": ended}


def withdrawal_item(row: dict, ctx: Context) -> dict:
    """withdrawal_requests → `Withdrawal` fields (currency = the doctor's). Rejected: a status
    §1.11 does not list, a negative amount, a doctor id naming another user type."""
    doctor_id = required_id(row, "doctor_id")
    check_role(ctx, doctor_id, "doctor", "doctor_id")
    amount = to_minor(row.get("amount"))
    check_not_negative(amount, "amount")
    return {"key": f"withdrawal_requests:{required_id(row, 'id')}", "doctor_id": doctor_id,
            "amount_minor": amount,
            "currency": ctx.doctor_currency.get(doctor_id, "USD"),
            "status": documented_status(row.get("status"), "withdrawal_requests"),
            "requested_at": to_utc(row.get("created_at"), "created_at"),
            "paid_at": to_utc(row.get("paid_at"), "paid_at"),
            "reason": row.get("rejection_reason")}


def wallet_item(row: dict, ctx: Context) -> dict:
    """doctor_wallets → `Wallet` fields; one number per doctor, in the doctor's currency (B32)."""
    doctor_id = required_id(row, "doctor_id")
    check_role(ctx, doctor_id, "doctor", "doctor_id")
    return {"key": f"doctor_wallets:{required_id(row, 'id')}", "doctor_id": doctor_id,
            "currency": ctx.doctor_currency.get(doctor_id, "USD"),
            "balance_minor": to_minor(row.get("balance") or 0, "balance"),
            "total_earned_minor": to_minor(row.get("total_earned") or 0, "total_earned"),
            "total_withdrawn_minor": to_minor(row.get("total_withdrawn") or 0,
                                              "total_withdrawn")}


ITEM_BUILDERS = {"plans": plan_item, "users": user_item, "subscriptions": subscription_item,
                 "subscription_members": member_item, "payment_transactions": payment_item,
                 "appointments": appointment_item, "text_sessions": text_session_item,
                 "call_sessions": call_session_item,
                 "text_appointment_sessions": text_appointment_session_item,
                 "withdrawal_requests": withdrawal_item, "doctor_wallets": wallet_item}
