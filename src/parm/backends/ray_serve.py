"""The Ray Serve backend: every instance is a Serve deployment with one replica on a Ray cluster.

Install with ``pip install "parm-serving[ray]"``. The frontend (batching, coding groups,
encoder, decoder, tracker, dispatcher) is the same code as with the embedded backend; only the
transport differs:

- **One deployment per instance.** ParM must place the k members of a coding group on
  different instances, and Serve's handles cannot target a replica of a deployment
  (``handle.options()`` has no replica selector and the default router picks by queue length).
  With one single-replica deployment per instance, the frontend's dispatcher chooses the
  instance exactly as with local processes, and Serve still places, health-checks and replaces
  the replica. Each instance is its own Serve application (``parm-<token>-<id>``, no HTTP route),
  so two ParM frontends can share one cluster.
- **Calls.** A batch goes out as ``handle.options(stream=True).run.remote(payload, shape, spare)``: the
  replica first says when its model thread takes the batch, then sends the output. Both are
  awaited with a deadline (``request_timeout_s``). An original that the decoder reconstructed is
  cancelled with the response's ``cancel()`` (``Backend.cancel``) if the replica has not started
  it; a started batch runs to the end, so every answer a replica computes comes back, and only
  a replica that starts nothing at all looks silent to the frontend's stall detector.
- **Failure detection.** The backend keeps one streaming ``watch`` call open on every replica:
  the replica first yields its actor name, then never answers. When the replica dies (a crash, an
  injected crash, ``ray.kill``), Ray fails that call within milliseconds, which plays the part of
  the local backend's process sentinel. A dead instance is reported through ``on_failure``; the
  backend then waits for Serve's replacement (a new actor name on a fresh ``watch``) and reports
  ``on_ready``. ``kill`` (the frontend's stall detector) is ``ray.kill`` of the replica actor.
- **Faults** run inside the replica with the same :class:`parm.backends.worker.ModelRunner` as
  local processes (slowdowns, stalls, injected crashes as ``os._exit``).
- **Models** travel with the deployment: a checkpoint folder is read on the driver and shipped
  as bytes, so nodes of a multi-node cluster need ParM and PyTorch installed but not the files.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError, TaskCancelledError
    from ray.serve.api import RunTarget
except ImportError as exc:  # pragma: no cover - exercised only where Ray is missing
    raise ImportError(
        "the Ray Serve backend needs Ray Serve, which is not installed: pip install \"parm-serving[ray]\" "
        "(or pip install \"ray[serve]\")") from exc

from parm.backends.base import Backend, InstanceSpec, ModelRef, OnFailure, OnReady, OnResult
from parm.backends.worker import INJECTED_CRASH_EXIT, ModelRunner
from parm.errors import ConfigError, InstanceFailedError

log = logging.getLogger(__name__)

SERVE_NAMESPACE = "serve"  # where Serve keeps its replica actors
MAX_ONGOING = 8  # per replica: the frontend's in-flight batches (<= 2) plus the watch and control calls
_started_local = threading.Event()  # this process started a local Ray cluster (see shutdown_cluster)


# ---- replica side -----------------------------------------------------------------------------
def packed_checkpoint(files: dict[str, bytes]) -> nn.Module:
    """Rebuild a model from the files of a checkpoint folder (``ModelRef`` factory, used in replicas)."""
    from parm.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="parm-ckpt-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_checkpoint(tmp)[0]


def _portable(spec: InstanceSpec) -> InstanceSpec:
    """The spec with its checkpoint folders (model and spare) replaced by their bytes, so any node can load them."""
    return replace(spec, model=_portable_ref(spec.model), spare=None if spec.spare is None else _portable_ref(spec.spare))


def _portable_ref(ref: ModelRef) -> ModelRef:
    if ref.checkpoint is None:
        return ref
    folder = Path(ref.checkpoint)
    if not (folder / "record.json").is_file():
        raise ConfigError(f"checkpoint folder {folder} has no record.json; pass a folder written by parm train-*",
                          field="checkpoint", value=str(folder))
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
             if p.is_file() and (p.name == "record.json" or p.suffix == ".safetensors")}
    return ModelRef(factory="parm.backends.ray_serve:packed_checkpoint", kwargs={"files": files})


class InstanceReplica:
    """The body of every instance deployment: the worker's ModelRunner behind async methods.

    Batches run one at a time on a single worker thread (an instance serves one batch at a
    time, as an accelerator would), so the replica's event loop stays free for Serve's health
    checks, the watch stream and cancellations; a batch cancelled while it waits is never run.
    """

    def __init__(self, spec: InstanceSpec, t0_wall_s: float) -> None:
        os.environ["OMP_NUM_THREADS"] = "1"
        self.runner = ModelRunner(spec, t0_wall_s)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="parm-model")
        self.released: asyncio.Event | None = None
        self.crash_timer: threading.Timer | None = None
        self._arm_crash()

    def _arm_crash(self) -> None:
        if self.crash_timer is not None:
            self.crash_timer.cancel()
            self.crash_timer = None
        if self.runner.crash_at_s is not None:  # an idle instance crashes on time too, as a local process does
            self.crash_timer = threading.Timer(max(0.0, self.runner.crash_at_s - self.runner.now_s()), _crash,
                                               args=(self.runner.spec.instance_id,))
            self.crash_timer.daemon = True
            self.crash_timer.start()

    async def set_origin(self, t0_wall_s: float) -> None:
        self.runner.set_origin(t0_wall_s)
        self._arm_crash()

    async def watch(self):  # noqa: ANN201 - an async generator Serve streams
        """Yield this replica's actor name and the Ray node it runs on, then nothing until the
        replica dies or is released."""
        self.released = self.released or asyncio.Event()
        context = ray.get_runtime_context()
        yield context.get_actor_name(), context.get_node_id()
        await self.released.wait()

    async def release(self) -> None:
        if self.released is not None:
            self.released.set()

    async def run(self, payload: bytes, shape: tuple[int, ...], spare: bool = False):  # noqa: ANN201 - an async generator
        """Yield ``None`` when the model thread takes the batch, then ``(output bytes, shape)``.

        The first item tells the driver the batch is running: from then on a cancel no longer
        aborts it, so the work an instance really does always comes back (and counts as a sign
        of life); a batch cancelled before it starts is dropped here, never run."""
        while self.runner.stalled():  # alive but silent: the frontend has to notice and kill us
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def job() -> np.ndarray:
            loop.call_soon_threadsafe(started.set)
            return self.runner.run(payload, shape, spare)

        future = loop.run_in_executor(self.pool, job)
        try:
            await started.wait()
        except asyncio.CancelledError:
            future.cancel()  # still queued behind another batch: never run
            raise
        yield None
        out = await future
        yield out.tobytes(), tuple(out.shape)


def _crash(instance_id: int) -> None:
    log.warning("instance %d: injected crash", instance_id)
    os._exit(INJECTED_CRASH_EXIT)


# ---- driver side ------------------------------------------------------------------------------
@dataclass
class _Call:
    """A batch sent to a replica: its response stream, and whether the replica started it."""

    stream: Any
    started: bool = False


@dataclass
class _Instance:
    spec: InstanceSpec
    app: str
    handle: Any = None
    stream_handle: Any = None  # handle.options(stream=True), made once
    actor: str | None = None  # the current replica's actor name
    node: str | None = None  # the Ray node it runs on (its failure domain when the spec names no zone)
    healthy: bool = False
    generation: int = 0  # bumped when the replica is found dead; stale outcomes are ignored
    kill_reason: str | None = None
    pending: dict[int, _Call] = field(default_factory=dict)  # work id -> its call
    tasks: set[asyncio.Task] = field(default_factory=set)


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to the Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://...``), or
    start a local one when it is None; start Serve without its HTTP proxy (ParM has its own
    ingress). Returns True when this process started a local cluster. Idempotent. Call it from a
    thread that lives as long as the cluster should (the main thread): Ray stops a local
    cluster's processes when the thread that started them ends."""
    if not ray.is_initialized():
        if address is None:
            os.environ.setdefault("RAY_worker_niceness", "0")  # Ray would run replicas at nice 15
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            _started_local.set()
            atexit.register(shutdown_cluster)
        else:
            check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                raise ConfigError(f"could not connect to a Ray cluster at {address!r}: {exc}. Start one (ray start "
                                  f"--head) or leave out --ray-address to start a local cluster",
                                  field="ray_address", value=address) from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # it logs every cancelled request at INFO
    serve.start(proxy_location="Disabled",
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    return _started_local.is_set()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (ConfigError) when nothing listens at a ``HOST:PORT`` or ``ray://HOST:PORT``
    address; ``ray.init`` itself waits minutes on an unreachable one. ``auto`` is left to Ray."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at {address!r} ({exc}); start one (ray start --head) or leave out "
                          f"--ray-address to start a local cluster", field="ray_address", value=address) from None


def shutdown_cluster() -> None:
    """Disconnect from Ray; a local cluster this process started stops with it (Serve included).
    A cluster we only connected to keeps running (its other applications are not ours)."""
    _started_local.clear()
    if ray.is_initialized():
        ray.shutdown()


class RayServeBackend(Backend):
    """Instances as single-replica Ray Serve deployments (see module docstring).

    ``address``: a running cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``), or None to
    start a local one (or use the one this process already connected to). ``num_cpus``: CPUs
    each replica reserves (default: 1 on a cluster given by ``address``; none on the local
    cluster, where all replicas share this machine's cores whatever they reserve). ``stop``
    deletes this backend's applications and leaves Ray running, so several backends in one
    process (``parm bench`` runs one per mode) share one cluster; a local cluster this process
    started stops at exit, or at :func:`shutdown_cluster`.
    """

    def __init__(self, instances: list[InstanceSpec], *, address: str | None = None, num_cpus: float | None = None,
                 num_gpus: float | None = None, request_timeout_s: float = 60.0,
                 start_timeout_s: float = 300.0) -> None:
        if request_timeout_s <= 0 or start_timeout_s <= 0 or (num_cpus is not None and num_cpus < 0):
            raise ConfigError("request_timeout_s and start_timeout_s must be > 0 and num_cpus >= 0",
                              field="ray", value=(request_timeout_s, start_timeout_s, num_cpus))
        if num_gpus is not None and not 0 <= num_gpus:
            raise ConfigError(f"num_gpus (--gpus-per-instance) must be >= 0; got {num_gpus}", field="num_gpus",
                              value=num_gpus)
        self.instances = list(instances)
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.request_timeout_s = request_timeout_s
        self.start_timeout_s = start_timeout_s
        self.t0_wall_s = time.time()
        self.token = uuid.uuid4().hex[:8]
        self.restarts = 0
        self._state = {s.instance_id: _Instance(s, f"parm-{self.token}-{s.instance_id}") for s in self.instances}
        self._stopping = False
        self._deployed = False

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, on_result: OnResult, on_failure: OnFailure, on_ready: OnReady) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_result, self._on_failure, self._on_ready = on_result, on_failure, on_ready
        self.t0_wall_s = time.time()
        try:
            await asyncio.wait_for(self._start(), self.start_timeout_s)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, asyncio.TimeoutError):
                raise InstanceFailedError(
                    f"Ray Serve deployments were not ready within {self.start_timeout_s} s; check that the cluster "
                    f"has room for {len(self.instances)} replicas of {self.num_cpus} CPU each (ray status) and the "
                    f"replica logs under /tmp/ray/session_latest/logs/serve", instance=-1) from None
            raise

    async def _start(self) -> None:
        # On this thread, not a worker thread: Ray ties the local cluster's processes to the life of
        # the thread that started them (they would die with a thread pool's worker).
        local = connect(self.address)
        if self.num_cpus is None:  # on this machine's own cluster every replica shares its cores anyway
            self.num_cpus = 0.0 if local and self.address is None else 1.0
        targets = []
        for inst in self._state.values():
            spec = inst.spec
            deployment = serve.deployment(
                name=f"parm-{spec.role}-{spec.instance_id}", num_replicas=1, max_ongoing_requests=MAX_ONGOING,
                ray_actor_options=self.actor_options(spec), graceful_shutdown_timeout_s=1.0,
                graceful_shutdown_wait_loop_s=0.2, health_check_period_s=2.0)(InstanceReplica)
            targets.append(RunTarget(target=deployment.bind(_portable(spec), self.t0_wall_s), name=inst.app, route_prefix=None))
        self._deployed = True
        handles = await asyncio.to_thread(serve.run_many, targets, wait_for_ingress_deployment_creation=False,
                                          wait_for_applications_running=False)  # we wait, with our deadline
        for inst, handle in zip(self._state.values(), handles):
            inst.handle, inst.stream_handle = handle, handle.options(stream=True)
        await self._wait_running()
        await asyncio.gather(*(self._open_watch(inst, previous=None) for inst in self._state.values()))
        log.info("Ray Serve backend: %d instances deployed as applications parm-%s-*", len(self.instances), self.token)

    def actor_options(self, spec: InstanceSpec) -> dict[str, float]:
        """The resources a replica reserves: ``num_cpus`` each, and ``num_gpus`` (default 1; a fraction
        lets several replicas share a GPU) for an instance whose device is a GPU. Ray then gives the
        replica its GPU(s) as ``cuda`` (CUDA_VISIBLE_DEVICES), which is where its models run."""
        options = {"num_cpus": float(self.num_cpus or 0.0)}
        if spec.device.startswith("cuda"):
            options["num_gpus"] = 1.0 if self.num_gpus is None else float(self.num_gpus)
        return options

    async def _wait_running(self) -> None:
        """Until every application is RUNNING; a failed deployment raises with Serve's message."""
        waiting = {inst.app for inst in self._state.values()}
        while waiting:
            status = (await asyncio.to_thread(serve.status)).applications
            for name in list(waiting):
                app = status.get(name)
                state = None if app is None else str(getattr(app.status, "value", app.status))
                if state == "RUNNING":
                    waiting.discard(name)
                elif app is not None and state in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise InstanceFailedError(f"Serve could not deploy {name}: {app.message}", instance=-1)
            if waiting:
                await asyncio.sleep(0.25)

    async def stop(self) -> None:
        self._stopping = True
        for inst in self._state.values():
            inst.healthy = False
            for call in inst.pending.values():
                call.stream.cancel()
            for task in list(inst.tasks):
                task.cancel()
        tasks = [t for inst in self._state.values() for t in inst.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._deployed and ray.is_initialized():
            await asyncio.to_thread(self._delete_apps)
            self._deployed = False

    def _delete_apps(self, timeout_s: float = 60.0) -> None:
        names = {inst.app for inst in self._state.values()}
        for name in names:
            serve.delete(name, _blocking=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not names & set(serve.status().applications):
                return
            time.sleep(0.2)
        log.warning("Serve applications %s were still being deleted after %.0f s", sorted(names), timeout_s)

    # ---- replica watch ------------------------------------------------------------------
    async def _open_watch(self, inst: _Instance, previous: str | None) -> None:
        """Open a watch stream on the instance's replica; return once it names a replica other
        than ``previous`` (Serve's replacement), then mark the instance healthy."""
        while not self._stopping:
            stream = inst.stream_handle.watch.remote()
            try:
                actor, node = await _within(stream.__anext__(), 5.0)
            except (asyncio.TimeoutError, RayActorError, StopAsyncIteration, TaskCancelledError) as exc:
                stream.cancel()
                log.debug("instance %d: no replica yet (%s)", inst.spec.instance_id, type(exc).__name__)
                await asyncio.sleep(0.2)
                continue
            if actor == previous:  # the dead replica still routed to: wait for Serve to notice
                stream.cancel()
                await asyncio.sleep(0.2)
                continue
            if previous is not None:  # a replacement counts fault time from the run's origin too
                try:
                    await _within(inst.handle.set_origin.remote(self.t0_wall_s), self.request_timeout_s)
                except (asyncio.TimeoutError, RayActorError) as exc:
                    log.warning("instance %d: replacement replica %s did not answer (%s); waiting for another",
                                inst.spec.instance_id, actor, type(exc).__name__)
                    stream.cancel()
                    await asyncio.sleep(0.2)
                    continue
            inst.actor, inst.node, inst.kill_reason = actor, node, None
            inst.healthy = True
            self._spawn(inst, self._watch(inst, inst.generation, stream))
            return

    async def _watch(self, inst: _Instance, generation: int, stream: Any) -> None:
        try:
            await stream.__anext__()  # never yields again while the replica lives
            reason = "replica ended its watch stream"
        except (RayActorError, StopAsyncIteration) as exc:
            reason = f"replica died ({type(exc).__name__})"
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # anything else on the watch also means we lost the replica
            reason = f"replica watch failed: {type(exc).__name__}: {exc}"
        self._failed(inst, generation, reason)

    def _failed(self, inst: _Instance, generation: int, reason: str) -> None:
        if self._stopping or generation != inst.generation:
            return
        inst.generation += 1
        inst.healthy = False
        reason = inst.kill_reason or reason
        for call in inst.pending.values():
            call.stream.cancel()
        inst.pending.clear()
        iid = inst.spec.instance_id
        log.warning("instance %d (%s) failed: %s; waiting for Serve to replace replica %s", iid, inst.spec.role,
                    reason, inst.actor)
        self.restarts += 1
        self._on_failure(iid, reason)  # the frontend recovers its in-flight work first
        self._spawn(inst, self._replaced(inst, inst.actor))

    async def _replaced(self, inst: _Instance, previous: str | None) -> None:
        down_s = time.monotonic()
        await self._open_watch(inst, previous)
        if not self._stopping:
            log.warning("instance %d (%s) back on replica %s after %.1f s", inst.spec.instance_id, inst.spec.role,
                        inst.actor, time.monotonic() - down_s)
            self._on_ready(inst.spec.instance_id)

    def _spawn(self, inst: _Instance, coro: Any) -> None:
        task = self._loop.create_task(coro)
        inst.tasks.add(task)
        task.add_done_callback(inst.tasks.discard)

    # ---- I/O ----------------------------------------------------------------------------
    def send(self, instance_id: int, work_id: int, inputs: torch.Tensor, *, spare: bool = False) -> None:
        inst = self._state.get(instance_id)
        if inst is None or not inst.healthy:
            self._loop.call_soon(self._on_result, instance_id, work_id, None, "instance is down")
            return
        array = inputs.detach().to(torch.float32).contiguous().numpy()
        call = _Call(inst.stream_handle.run.remote(array.tobytes(), array.shape, spare))
        inst.pending[work_id] = call
        self._spawn(inst, self._await(inst, inst.generation, work_id, call))

    async def _await(self, inst: _Instance, generation: int, work_id: int, call: _Call) -> None:
        output, error = None, None
        deadline = time.monotonic() + self.request_timeout_s
        try:
            await _within(call.stream.__anext__(), self.request_timeout_s)  # the replica took it
            call.started = True
            payload, shape = await _within(call.stream.__anext__(), max(0.0, deadline - time.monotonic()))
            output = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(shape).copy())
        except asyncio.TimeoutError:
            call.stream.cancel()
            error = f"no answer from the replica within request_timeout_s={self.request_timeout_s}"
        except TaskCancelledError:  # includes Serve's RequestCancelledError
            error = "cancelled"
        except RayActorError as exc:
            inst.pending.pop(work_id, None)
            self._failed(inst, generation, f"replica died ({type(exc).__name__})")
            return
        except asyncio.CancelledError:
            call.stream.cancel()
            raise
        except Exception as exc:  # the model raised in the replica: this batch fails, the replica lives on
            cause = getattr(exc, "cause", None) or exc
            error = f"{type(cause).__name__}: {cause}"
        inst.pending.pop(work_id, None)
        if generation == inst.generation and not self._stopping:
            self._on_result(inst.spec.instance_id, work_id, output, error)

    def cancel(self, instance_id: int, work_id: int) -> None:
        """Cancel a batch the replica has not started (``response.cancel()``); one it is running
        finishes, and its answer comes back as usual."""
        inst = self._state.get(instance_id)
        call = None if inst is None else inst.pending.get(work_id)
        if call is not None and not call.started:
            call.stream.cancel()

    def set_time_origin(self, t0_wall_s: float) -> None:
        self.t0_wall_s = t0_wall_s
        for inst in self._state.values():
            if inst.healthy:
                self._spawn(inst, self._set_origin(inst, t0_wall_s))

    async def _set_origin(self, inst: _Instance, t0_wall_s: float) -> None:
        try:
            await _within(inst.handle.set_origin.remote(t0_wall_s), self.request_timeout_s)
        except (asyncio.TimeoutError, RayActorError) as exc:
            log.warning("instance %d: could not set the fault time origin (%s)", inst.spec.instance_id, exc)

    def healthy(self, instance_id: int) -> bool:
        inst = self._state.get(instance_id)
        return inst is not None and inst.healthy

    def kill(self, instance_id: int, reason: str) -> None:
        inst = self._state.get(instance_id)
        if inst is None or not inst.healthy or inst.actor is None:
            return
        inst.kill_reason = reason
        self._loop.run_in_executor(None, _kill_actor, inst.actor)

    def zone(self, instance_id: int) -> str | None:
        """The instance's failure domain: its spec's zone if given, else the Ray node its current
        replica runs on (a replacement on another node moves it)."""
        inst = self._state.get(instance_id)
        if inst is None:
            return None
        return inst.spec.zone or (None if inst.node is None else f"node:{inst.node}")

    def actor_name(self, instance_id: int) -> str | None:
        """The Ray actor name of the instance's current replica (for ``ray.get_actor``)."""
        inst = self._state.get(instance_id)
        return None if inst is None else inst.actor


async def _result(response: Any) -> Any:
    return await response


async def _within(response: Any, timeout_s: float) -> Any:
    """Await a Serve response for at most ``timeout_s`` (TimeoutError after; the caller cancels)."""
    task = asyncio.ensure_future(_result(response))
    task.add_done_callback(_retrieve)  # a cancelled wait leaves the request's own error unread otherwise
    return await asyncio.wait_for(task, timeout_s)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _kill_actor(name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
    except ValueError:
        pass  # already gone: the watch reports it
