"""What an operator watches: Prometheus metrics (`metrics.py`) and JSON logs (`logs.py`).

Imports none of the service's packages, so the API, the scheduler and the composition root
may all use it; the domain (`ledger/`) never does (it reports conflicts through a plain
callback instead).
"""

from observability.logs import configure_logging
from observability.metrics import Metrics, ProjectionCollector, WebhookCollector

__all__ = ["Metrics", "ProjectionCollector", "WebhookCollector", "configure_logging"]
