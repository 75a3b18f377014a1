"""Prometheus metrics of a serving frontend, in a registry of its own (one per frontend)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ServingMetrics:
    """Queries by source, latency histogram, reconstructions, re-sends, instance health, queue depth."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queries = Counter("parm_queries", "Queries answered, by source", ["source"], registry=r)
        self.latency = Histogram("parm_query_latency_seconds", "Query latency from arrival to answer",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.reconstructions = Counter("parm_reconstructions", "Data batches answered by decoding", registry=r)
        self.resends = Counter("parm_resends", "Data batches sent again (failure, stall, hedge)", registry=r)
        self.cancelled = Counter("parm_cancelled_batches", "Queued batches dropped after reconstruction", registry=r)
        self.instance_healthy = Gauge("parm_instance_healthy", "1 if the instance is up", ["instance", "role"],
                                      registry=r)
        self.instance_restarts = Counter("parm_instance_restarts", "Instance restarts", ["instance"], registry=r)
        self.queue_depth = Gauge("parm_queue_depth", "Batches waiting for an instance", ["queue"], registry=r)
        self.pending_queries = Gauge("parm_pending_queries", "Queries accepted and not yet answered", registry=r)
        self.rejected = Counter("parm_rejected_queries", "Queries refused (overload, bad input)", ["reason"],
                                registry=r)
        self.non_finite = Counter("parm_non_finite_answers", "Queries failed because their scores were NaN/inf",
                                  registry=r)
        self.unusable = Counter("parm_unusable_outputs", "Non-finite data or parity outputs kept out of decoding",
                                ["kind"], registry=r)
        self.out_of_envelope = Counter("parm_out_of_envelope_queries",
                                       "Queries outside the parity model's input envelope, by what was done with them",
                                       ["action"], registry=r)

    def resend_count(self) -> int:
        """Data batches sent again so far (hedges, failures, double erasures)."""
        return int(self.registry.get_sample_value("parm_resends_total") or 0)
