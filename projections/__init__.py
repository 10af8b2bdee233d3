"""Read models of the ledger: balances, wallets and live sessions/pools (billing-rules.md §4–§6).

`Projector` keeps them exactly once beside the event store, in a background thread of each
process (readers wait for a position with `wait_for`); `replay_verify` checks I7 (and I6);
`export_events` writes the event log as JSON lines.
"""

from projections.export import export_events
from projections.projector import Projector, ProjectionsBehind, ProjectionStalled
from projections.verify import VerifyReport, replay_verify

__all__ = ["Projector", "ProjectionsBehind", "ProjectionStalled", "VerifyReport", "export_events", "replay_verify"]
