"""Request payloads of the marketplace's event types (billing-rules.md §10).

`marketplace_payloads()` is called by api/schemas.py while it builds its event union, after
its field types are defined, and uses those same types (ids, texts, timestamps, currencies),
so every event type of the API follows one validation rule. Amounts are integer minor units,
rates integer basis points.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt

from ledger.consultations import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES
from ledger.marketplace import TICK_ONLY_TYPES

ConsultationType = Literal["individual", "couple", "family"]
Mode = Literal["video", "audio", "chat"]
Bps = Annotated[StrictInt, Field(ge=0, le=10_000, description="basis points (GST 18 % = 1800)")]
Minutes = Annotated[StrictInt, Field(ge=MIN_DURATION_MINUTES, le=MAX_DURATION_MINUTES)]


def marketplace_payloads() -> dict[str, type[BaseModel]]:
    """event type → payload model, for api/schemas.py's PAYLOADS."""
    base = sys.modules["api.schemas"]  # partly initialised: its field types exist by now
    Strict, Id, Text, Currency = base.Strict, base.Id, base.Text, base.Currency
    Instant = base.PayloadInstant  # within 366 days of occurred_at (else instant_out_of_range)
    Minor = Annotated[StrictInt, Field(gt=0, le=base.MAX_MINOR, description="minor units")]
    Provider = Id  # the payment provider's name (e.g. razorpay): an identifier

    class WalletToppedUpPayload(Strict):
        patient_id: Id
        currency: Currency
        amount_minor: Minor
        payment_reference: Id
        provider: Provider

    class WalletRefundedToSourcePayload(Strict):
        refund_id: Id
        payment_reference: Id
        amount_minor: Minor
        admin_id: Id
        reason: Text

    class WalletPaymentReversedPayload(Strict):
        payment_reference: Id
        amount_minor: Minor
        reason: Text = "chargeback"

    class Fee(Strict):
        consultation_type: ConsultationType
        duration_minutes: Minutes
        fee_minor: Minor

    class PriceListPublishedPayload(Strict):
        practitioner_id: Id
        version: Id
        currency: Currency
        tax_bps: Bps
        share_bps: Bps = 5000
        effective_from: Instant | None = Field(
            None, description="in force from (default: occurred_at; never earlier)")
        fees: Annotated[list[Fee], Field(min_length=1, max_length=100)]

    class ConsultationBookedPayload(Strict):
        consultation_id: Id
        patient_id: Id
        practitioner_id: Id
        consultation_type: ConsultationType
        mode: Mode
        start: Instant
        duration_minutes: Minutes

    class ConsultationPayload(Strict):
        consultation_id: Id

    class ConsultationActivatedPayload(Strict):
        consultation_id: Id
        admin_id: Id

    class ConsultationJoinedPayload(Strict):
        consultation_id: Id
        participant: Literal["patient", "practitioner"]

    class ConsultationEndedPayload(Strict):
        consultation_id: Id
        ended_by: Literal["patient", "practitioner"]

    class ConsultationCancelledPayload(Strict):
        consultation_id: Id
        reason: Text | None = None

    class ConsultationAdminPayload(Strict):
        consultation_id: Id
        admin_id: Id
        reason: Text

    payloads: dict[str, type[BaseModel]] = {
        "wallet.topped_up": WalletToppedUpPayload,
        "wallet.refunded_to_source": WalletRefundedToSourcePayload,
        "wallet.payment_reversed": WalletPaymentReversedPayload,
        "price_list.published": PriceListPublishedPayload,
        "consultation.booked": ConsultationBookedPayload,
        "consultation.activated": ConsultationActivatedPayload,
        "consultation.joined": ConsultationJoinedPayload,
        "consultation.ended": ConsultationEndedPayload,
        "consultation.cancelled": ConsultationCancelledPayload,
        "consultation.declined": ConsultationCancelledPayload,
        "consultation.admin_cancelled": ConsultationAdminPayload,
        "consultation.refunded": ConsultationAdminPayload,
    }
    # Known, so that posting one is a 403 (api/event_permissions.py), never a 422.
    payloads.update({event_type: ConsultationPayload for event_type in TICK_ONLY_TYPES})
    return payloads
