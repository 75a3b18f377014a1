"""The same frontend code over both backends: one parametrised test body, run against local
processes and against Ray Serve deployments (marker ``ray``).

Faults are injected inside the instances (a straggler, then a crash or a stall), so each run
exercises the transport's whole failure path: a dead process or replica noticed and replaced, a
silent one killed by the frontend's stall detector. Toy linear models with an exact parity model
let every answer, reconstructed ones included, be checked against W·x + b.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from parm.backends import InstanceSpec, LocalBackend, ModelRef
from parm.faults import parse_fault_spec
from parm.models.toy import linear
from parm.serving import Frontend, ServingConfig, Source, instance_roles
from parm.system import with_faults
from steady_load import serve_all, settled

SHAPE = (1, 28, 28)
N_QUERIES = 300
RATE_QPS = 60.0
FAULTS = {
    "crash": "straggler:instance=0,factor=8;crash:instance=1,at_s=1.5",
    "stall": "straggler:instance=0,factor=8;stall:instance=1,at_s=1.5",
}


def toy_specs(k: int = 2, m: int = 2) -> list[InstanceSpec]:
    data = ModelRef(factory="parm.models.toy:linear", kwargs={"in_shape": SHAPE})
    parity = ModelRef(factory="parm.models.toy:linear_parity", kwargs={"in_shape": SHAPE, "k": k})
    return [InstanceSpec(i, role, parity if role == "parity" else data, emulated_ms=3.0)
            for i, role in enumerate(instance_roles("coded", m, k))]


def make_backend(name: str, fault: str, request: pytest.FixtureRequest):
    specs = with_faults(toy_specs(), parse_fault_spec(FAULTS[fault]))
    if name == "local":
        return LocalBackend(specs)
    request.getfixturevalue("ray_cluster")  # skips with the install hint where Ray is missing
    from parm.backends.ray_serve import RayServeBackend

    return RayServeBackend(specs)


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("backend_name", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_frontend_serves_through_faults_alike_on_both_backends(backend_name: str, fault: str,
                                                              request: pytest.FixtureRequest) -> None:
    torch.manual_seed(3)
    queries = torch.randn(N_QUERIES, *SHAPE)
    backend = make_backend(backend_name, fault, request)
    frontend = Frontend(ServingConfig(SHAPE, mode="coded", k=2, stall_timeout_ms=500.0), backend)
    predictions = asyncio.run(serve_all(frontend, queries, RATE_QPS))

    failed = [p for p in predictions if isinstance(p, BaseException)]
    assert not failed, failed[:3]
    scores = torch.stack([p.scores for p in predictions])
    torch.testing.assert_close(scores, linear(SHAPE)(queries).detach(), rtol=1e-4, atol=1e-4)
    assert settled(frontend, Source.RECONSTRUCTED) > 0, "the straggler's batches were never reconstructed"
    assert settled(frontend, Source.ERROR) == 0
    assert backend.restarts >= 1, f"the injected {fault} was not noticed"
