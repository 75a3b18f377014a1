"""Placement of coding groups across failure domains, through the whole frontend.

The fake backend (tests/fakes.py) with ``InstanceSpec.zone`` labels; virtual time, so nothing
sleeps. The dispatcher's rules themselves are tested in test_dispatch.py; this checks the
wiring: the coded policy's parity batches carry their group, and the default ``Backend.zone``
reports the specs' zones.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from fakes import FakeBackend, specs_for
from parm.models.toy import linear
from parm.serving.config import ServingConfig, instance_roles
from parm.serving.frontend import Frontend
from parm.testing import run_virtual

S = (1, 4, 4)
C = 5
K = 2


def test_parity_runs_outside_the_zone_of_its_members_through_the_frontend() -> None:
    """Data instances and parity instance 4 in zone a, parity instance 5 in zone b: every
    parity batch goes to instance 5, though instance 4 is idle longest after the first."""
    specs = specs_for(instance_roles("coded", 4, K), S, C, K)
    specs = [replace(s, zone="b" if s.instance_id == 5 else "a") for s in specs]
    assert [s.role for s in specs[4:]] == ["parity", "parity"]
    backend = FakeBackend(specs, delay_s=0.001)
    qs = torch.randn(8, *S, generator=torch.Generator().manual_seed(0))

    async def main() -> list:
        loop = asyncio.get_running_loop()
        frontend = Frontend(ServingConfig(query_shape=S, mode="coded", k=K), backend, clock=loop.time)
        await frontend.start()
        try:
            before = len(backend.sends_to("parity"))  # start-up probes, if any
            preds = [await asyncio.wait_for(frontend.submit(q), 2.0) for q in qs]  # one group at a time
            await backend.until(lambda: len(backend.sends_to("parity")) - before == len(qs) // K)
            assert {s.instance for s in backend.sends_to("parity")[before:]} == {5}
            return preds
        finally:
            await frontend.stop()

    preds = run_virtual(asyncio.wait_for(main(), 10.0))
    truth = linear(S, C).eval()
    with torch.no_grad():
        for pred, q in zip(preds, qs):
            torch.testing.assert_close(pred.scores, truth(q[None])[0], atol=1e-5, rtol=1e-5)
