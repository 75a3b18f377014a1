"""Instance health seen from the frontend: the stall watchdog, the gauges it refreshes, and
the ``/healthz`` report."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parm.serving.frontend import Frontend

log = logging.getLogger(__name__)

STALL_CHECK_S = 0.05


async def watch_stalls(frontend: Frontend) -> None:
    """Forever: kill an instance silent on a batch for ``stall_timeout_ms`` (the backend
    restarts it and the frontend recovers its work), and refresh the queue gauges."""
    config, dispatcher, metrics = frontend.config, frontend.dispatcher, frontend.metrics
    timeout_s = config.stall_timeout_ms / 1e3
    last_error_s = -math.inf
    while True:
        await asyncio.sleep(STALL_CHECK_S)
        try:
            for instance_id in dispatcher.stalled(frontend.clock(), timeout_s):
                log.warning("instance %d has not answered for %.1f s; killing it", instance_id, timeout_s)
                frontend.backend.kill(instance_id, f"no answer within stall_timeout_ms={config.stall_timeout_ms}")
            for role in sorted({s.role for s in frontend.backend.instances}):
                metrics.queue_depth.labels(role).set(dispatcher.depth(role))
            metrics.pending_queries.set(frontend.pending_queries())
        except Exception:  # the watchdog must outlive any one bad check; logged at most every 10 s
            if time.monotonic() - last_error_s > 10.0:
                last_error_s = time.monotonic()
                log.exception("stall watchdog check failed; it keeps watching")


def health_report(frontend: Frontend) -> dict[str, Any]:
    """``status``: ``ok`` when every instance is up, ``degraded`` when some is down (restarting, or
    failing to restart) but a data instance still serves, ``down`` when none does. ``ok`` is true
    only in the first case and ``serving`` in the first two (the HTTP edge answers 200 while
    ``serving``, else 503). Every instance is listed with its queue and in-flight work."""
    backend, dispatcher = frontend.backend, frontend.dispatcher
    instances = [{"id": s.instance_id, "role": s.role, "zone": backend.zone(s.instance_id), "device": s.device,
                  "healthy": backend.healthy(s.instance_id),
                  "in_flight": len(dispatcher.instances[s.instance_id].in_flight), "queued": dispatcher.depth(s.role)}
                 for s in backend.instances]
    serving = any(i["healthy"] for i in instances if i["role"] == "data")
    up = all(i["healthy"] for i in instances)
    status = "ok" if up else "degraded" if serving else "down"
    return {"ok": up, "status": status, "serving": serving, "mode": frontend.config.mode, "instances": instances,
            "pending_queries": frontend.pending_queries(), "queue_depth": dispatcher.depth("data")}
