"""The audit (docs/audit.md): a tamper-evident log, digests, and the ledger as of any instant.

- `chain.py`: the canonical bytes of a stored event, links, digests (pure);
- `logs.py`: the logs followed (ledger, legacy) and their safe head;
- `chainer.py`, `history.py`: followers of the committed log with tracking (`tracking.py`),
  writing the audit tables (`schema.py`) — the chain's links, and every account's values after
  every event that moved it;
- `verify.py`: `ledger audit verify`; `asof.py`, `statements.py`: the reads;
- `service.py` `AuditService`: all of it as plain functions; `follower.py`: the background
  thread; `cli.py`: the commands.
"""
