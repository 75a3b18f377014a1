"""Where do the slowest batches of a simulated run lose their time?

Runs one trial of an experiment's ``[simulate]`` section for one mode through the real frontend
(as ``parm simulate`` does) and follows every batch: when it formed, when each copy was sent and
where, when its group's parity batch was sent and answered, and how it was answered. Prints the
p50/p99/p99.9 of the run, then for the slowest 1% of batches how many waited in the frontend's
data queue, were re-sent, had a late parity, or a late group partner, and the queue waits of all
batches. docs/EVALUATION.md (the simulator sections) quotes it.

    python scripts/trace_simulation.py experiments/default.toml coded-hedge
    python scripts/trace_simulation.py experiments/default.toml coded-hedge --set max_in_flight=2
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import numpy as np

from parm.bench.experiment import SIM_SERVING_KEYS, load_experiment
from parm.bench.run_experiment import trial_faults
from parm.bench.simulate import ServiceModel, sim_serving_config, simulate
from parm.serving import Frontend
from parm.serving.config import instance_roles


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


class TracingFrontend(Frontend):
    """The real frontend, recording each batch's and each work's story (times in seconds)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.formed: dict[int, tuple[float, int | None]] = {}  # batch -> (formed at, group)
        self.settled: dict[int, tuple[float, str]] = {}  # batch -> (answered at, source)
        self.sends: dict[tuple[str, int], list[tuple[float, int, bool, float]]] = collections.defaultdict(list)
        self.done: dict[tuple[str, int], float] = {}  # first answer of a (kind, key)
        self.members: dict[int, list[int]] = collections.defaultdict(list)
        self._queued: dict[int, float] = {}  # work id -> submitted at
        inner_send, inner_submit = self.dispatcher.on_send, self.dispatcher.submit

        def on_send(work: Any) -> None:
            queued = self.clock() - self._queued.pop(work.work_id, self.clock())
            self.sends[(work.kind, work.key)].append((self.clock(), work.instance, work.retry, queued))
            if inner_send is not None:
                inner_send(work)

        def submit(work: Any, *, front: bool = False) -> None:
            self._queued[work.work_id] = self.clock()
            inner_submit(work, front=front)

        self.dispatcher.on_send, self.dispatcher.submit = on_send, submit  # type: ignore[method-assign]

    def _on_batch(self, batch: Any) -> None:
        super()._on_batch(batch)
        group = self.policy.group_of(batch.batch_id)
        self.formed[batch.batch_id] = (batch.created_s, group)
        if group is not None:
            self.members[group].append(batch.batch_id)

    def _on_result(self, instance_id: int, work_id: int, output: Any, error: str | None) -> None:
        work = self.dispatcher.instances[instance_id].in_flight.get(work_id)
        if work is not None:
            self.done.setdefault((work.kind, work.key), self.clock())
        super()._on_result(instance_id, work_id, output, error)

    def settle(self, batch: Any, source: Any, outputs: Any = None, instance: int | None = None, *,
               error: Exception | None = None) -> bool:
        if not batch.answered:
            self.settled[batch.batch_id] = (self.clock(), source.value)
        return super().settle(batch, source, outputs, instance, error=error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("mode")
    parser.add_argument("--trial", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a ServingConfig setting")
    args = parser.parse_args()
    exp = load_experiment(args.experiment)
    sim = exp.simulate
    point = exp.points(simulated=True)[0]
    settings: dict[str, Any] = {key: sim[key] for key in SIM_SERVING_KEYS if key in sim}
    settings.update(k=point.k, batch_size=point.batch_size, **point.settings)
    settings.update({key: _value(value) for key, value in (item.split("=", 1) for item in args.set)})
    config = sim_serving_config(args.mode, settings=settings)
    roles = instance_roles(args.mode, int(sim["instances"]), config.k, config.r)
    queries, warmup = int(sim.get("queries", 10_000)), int(sim.get("warmup", 0))
    holder: dict[str, TracingFrontend] = {}

    def factory(*a: Any, **kw: Any) -> TracingFrontend:
        holder["fe"] = TracingFrontend(*a, **kw)
        return holder["fe"]

    sink = simulate(config, roles, ServiceModel(**sim.get("service", {})), queries=queries, rate_qps=point.rate,
                    faults=trial_faults(point.faults, args.trial), seed=int(exp.load.get("seed", 0)) + args.trial,
                    warmup=warmup, frontend_factory=factory)
    fe, hist = holder["fe"], sink.histogram
    print(f"{args.mode} {point.label} trial {args.trial} {' '.join(args.set)}: p50 {hist.percentile(50):.1f} "
          f"p99 {hist.percentile(99):.1f} p99.9 {hist.percentile(99.9):.1f} ms")
    first = min(fe.formed) + warmup  # batch size 1 in the experiments this is written for: one batch per query
    latency = {b: (fe.settled[b][0] - t) * 1e3 for b, (t, _) in fe.formed.items() if b >= first and b in fe.settled}
    threshold = float(np.percentile(list(latency.values()), 99))
    slow = [b for b, ms in latency.items() if ms > threshold]
    counts: collections.Counter[str] = collections.Counter()
    for b in slow:
        formed, group = fe.formed[b]
        sends = fe.sends[("data", b)]
        counts[f"answered {fe.settled[b][1]}"] += 1
        counts["first sent > 10 ms after forming"] += bool(sends) and (sends[0][0] - formed) * 1e3 > 10
        counts["re-sent"] += any(retry for _, _, retry, _ in sends)
        counts["re-sent to a parity instance"] += any(retry and roles[i] != "data" for _, i, retry, _ in sends)
        if group is not None:
            parity_sends = fe.sends.get(("parity", group), [])
            counts["parity sent > 10 ms after forming"] += bool(parity_sends) and (parity_sends[0][0] - formed) * 1e3 > 10
            parity_done = fe.done.get(("parity", group))
            counts["parity answered after the batch"] += parity_done is None or parity_done >= fe.settled[b][0]
            partners = [m for m in fe.members[group] if m != b and m in latency]
            counts["a group partner also in the slowest 1%"] += any(latency[m] > threshold for m in partners)
    print(f"slowest 1% of batches: {len(slow)} (above {threshold:.1f} ms)")
    for name, n in sorted(counts.items()):
        print(f"  {name}: {n}")
    for kind in ("data", "parity"):
        waits = np.array([s[3] * 1e3 for (k, _), ss in fe.sends.items() if k == kind for s in ss[:1]])
        if waits.size:
            print(f"{kind} queue wait ms (first copy): mean {waits.mean():.2f} p99 {np.percentile(waits, 99):.1f} "
                  f"p99.9 {np.percentile(waits, 99.9):.1f}")
    spare = sum(1 for (k, _), ss in fe.sends.items() if k == "data" for _, i, _, _ in ss if roles[i] != "data")
    print(f"data batches run on parity instances: {spare}")


if __name__ == "__main__":
    main()
