"""One instance's fault schedule: what a worker asks before answering a batch.

:meth:`InstanceFaults.build` turns a :class:`~parm.faults.spec.FaultSpec` into a picklable,
precomputed schedule for one instance. Every answer depends only on (spec, instance index,
time since the run started ``t_s``) — never on how many batches the instance has served — so
the same seeded spec injects the same faults in every serving mode. The one exception is the
per-batch random delay, drawn from the batch's per-instance sequence number. A ``shuffle``
without ``instances`` also depends on the run's instance count (``n_instances``), because its
pairs are drawn among all instances.

Seeding scheme (all streams are independent of each other and of the horizon):

- slow episodes of the fault at position ``p`` in ``spec.faults`` on instance ``i``:
  ``numpy.random.default_rng(SeedSequence(spec.seed, spawn_key=(i, p, 0)))``; inter-arrival
  gaps are ``-log1p(-u) / rate_hz`` for ``u = rng.random(4096)`` drawn in fixed chunks, so a
  longer horizon extends a shorter one's episodes exactly.
- the delay fault at position ``p`` on instance ``i`` gets a 16-byte key
  ``SeedSequence(spec.seed, spawn_key=(i, p, 1)).generate_state(4, uint32)``; batch ``n``'s
  draw is ``blake2b(n as 8 little-endian bytes, key=key, digest_size=16)``, read as two
  little-endian 64-bit words whose top 53 bits give uniforms u1, u2 (a counter-based stream:
  ~1 µs per batch, a pure function of n). ``u1 < prob`` decides whether the batch is delayed;
  u2 sets the delay (``exp``: ``-mean·log1p(-u2)``; ``uniform``: ``2·mean·u2``; ``const``: mean).
- shuffle slot ``c`` (0 <= c < concurrent) of the fault at position ``p``: one *global* stream,
  the same for every instance (the key has no instance index):
  ``default_rng(SeedSequence(spec.seed, spawn_key=(p, c, 2)))``. Shuffle ``j`` of the slot
  occupies [j·d, (j+1)·d) and joins candidates ``a`` and ``b``: per chunk of 4096 shuffles,
  ``a = rng.integers(0, n, 4096)`` then ``o = rng.integers(0, n - 1, 4096)``, ``b = o + (o >= a)``
  (a uniform unordered pair of distinct candidates; ``n`` candidates, sorted). Fixed chunks make
  a longer horizon extend a shorter one's shuffles exactly.

Overlapping episodes of one ``slow`` fault merge (the instance is under that load or not);
factors of different faults (slow episodes, stragglers) multiply. A transfer to or from an
instance in s(t) shuffles of a fault gets 1/(s+1) of that fault's link, so it takes
``nbytes·8·s / (link_mbps·1e6)`` extra seconds; extras of several shuffle faults add up.
Episodes and shuffles are generated up to ``horizon_s``: later times see none, so build with a
horizon longer than the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from parm.errors import ConfigError
from parm.faults.spec import Crash, FaultSpec, RandomDelay, Shuffle, SlowEpisodes, Stall, Straggler

log = logging.getLogger(__name__)

_STREAM_SLOW = 0
_STREAM_DELAY = 1
_STREAM_SHUFFLE = 2
_CHUNK = 4096  # uniforms drawn per step; fixed so episodes do not depend on the horizon
_MAX_EPISODES = 10_000_000
_U53 = 2.0**-53


def _poisson_starts(rng: np.random.Generator, rate_hz: float, horizon_s: float) -> np.ndarray:
    """Arrival times in [0, horizon_s) of a Poisson process of ``rate_hz``: shape (n,)."""
    parts, last_s = [], 0.0
    while last_s < horizon_s:
        gaps_s = -np.log1p(-rng.random(_CHUNK)) / rate_hz  # (CHUNK,)
        times_s = last_s + np.cumsum(gaps_s)  # (CHUNK,)
        parts.append(times_s)
        last_s = float(times_s[-1])
    starts_s = np.concatenate(parts)  # (n_drawn,)
    return starts_s[starts_s < horizon_s]  # (n,)


def _merge_fixed(starts_s: np.ndarray, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Union of [s, s + duration) for sorted starts: (blocks,), (blocks,). Ends stay sorted
    because every interval has the same length, so a block ends where the next start is later
    than the previous end."""
    if starts_s.size == 0:
        return starts_s, starts_s
    ends_s = starts_s + duration_s  # (n,)
    gap = starts_s[1:] > ends_s[:-1]  # (n-1,) True where a new block begins
    first = np.concatenate(([True], gap))  # (n,)
    last = np.concatenate((gap, [True]))  # (n,)
    return starts_s[first], ends_s[last]


@dataclass(frozen=True)
class _SlowTimeline:
    """Merged episodes of one ``slow`` fault on one instance: [starts_s[j], ends_s[j])."""

    factor: float
    starts_s: array = field(repr=False)  # array('d'), sorted
    ends_s: array = field(repr=False)  # array('d'), sorted, ends_s[j] < starts_s[j + 1]
    raw_count: int = 0  # episodes before merging

    def active(self, t_s: float) -> bool:
        j = bisect_right(self.starts_s, t_s) - 1
        return j >= 0 and t_s < self.ends_s[j]

    @classmethod
    def build(
        cls, fault: SlowEpisodes, seed: int, instance: int, position: int, horizon_s: float
    ) -> _SlowTimeline:
        expected = fault.rate_hz * horizon_s
        if expected > _MAX_EPISODES:
            raise ConfigError(
                f"slow: rate_hz*horizon_s = {fault.rate_hz}*{horizon_s} = {expected:.3g} episodes, over "
                f"{_MAX_EPISODES:,}; shorten horizon_s or lower rate_hz", field="horizon_s", value=horizon_s,
            )
        ss = np.random.SeedSequence(seed, spawn_key=(instance, position, _STREAM_SLOW))
        rng = np.random.default_rng(ss)
        raw = _poisson_starts(rng, fault.rate_hz, horizon_s)  # (n,)
        starts_s, ends_s = _merge_fixed(raw, fault.duration_s)
        return cls(fault.factor, array("d", starts_s.tolist()), array("d", ends_s.tolist()), int(raw.size))


@dataclass(frozen=True)
class _DelayStream:
    """One ``delay`` fault on one instance; the draw for batch n is a pure function of (key, n)."""

    key: bytes = field(repr=False)  # 16 bytes from SeedSequence(seed, spawn_key=(instance, position, 1))
    mean_s: float
    dist: str
    prob: float

    @classmethod
    def build(cls, fault: RandomDelay, seed: int, instance: int, position: int) -> _DelayStream:
        ss = np.random.SeedSequence(seed, spawn_key=(instance, position, _STREAM_DELAY))
        key = ss.generate_state(4, np.uint32).astype("<u4").tobytes()  # 16 bytes
        return cls(key, fault.mean_ms / 1e3, fault.dist, fault.prob)

    def sample_s(self, batch_seq: int) -> float:
        digest = hashlib.blake2b(batch_seq.to_bytes(8, "little"), key=self.key, digest_size=16).digest()
        if (int.from_bytes(digest[:8], "little") >> 11) * _U53 >= self.prob:
            return 0.0
        u = (int.from_bytes(digest[8:], "little") >> 11) * _U53  # uniform in [0, 1)
        if self.dist == "exp":
            return -self.mean_s * math.log1p(-u)
        if self.dist == "uniform":
            return 2.0 * self.mean_s * u
        return self.mean_s


def _shuffle_pairs(seed: int, position: int, slot: int, n_candidates: int, count: int) -> np.ndarray:
    """The first ``count`` pairs of shuffle slot ``slot`` of the fault at ``position``, as indices
    into the sorted candidate tuple: shape (count, 2), the two columns always differ. Global: no
    instance index enters the seed, so every instance sees the same draw."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(position, slot, _STREAM_SHUFFLE)))
    parts, drawn = [], 0
    while drawn < count:
        first = rng.integers(0, n_candidates, _CHUNK)  # (CHUNK,)
        other = rng.integers(0, n_candidates - 1, _CHUNK)  # (CHUNK,)
        second = other + (other >= first)  # (CHUNK,) uniform over the candidates except first
        parts.append(np.stack((first, second), axis=1))  # 2 × (CHUNK,) -> (CHUNK, 2)
        drawn += _CHUNK
    return np.concatenate(parts)[:count] if parts else np.zeros((0, 2), np.int64)  # (count, 2)


def _shuffles_per_slot(duration_s: float, horizon_s: float) -> int:
    """How many back-to-back shuffles of ``duration_s`` a slot needs to cover [0, horizon_s)."""
    count = math.ceil(horizon_s / duration_s)
    return count + 1 if count * duration_s < horizon_s else count


def _shuffle_candidates(fault: Shuffle, n_instances: int | None) -> tuple[int, ...]:
    """The sorted instance indices ``fault`` draws its pairs among (ConfigError if under 2)."""
    if fault.instances is not None:
        return fault.instances
    if n_instances is None:
        raise ConfigError(
            f"fault {fault.to_text()!r} draws shuffle pairs among all instances; pass n_instances "
            f"(the run's instance count) to InstanceFaults.build, or give instances", field="n_instances", value=None,
        )
    if n_instances < 2:
        raise ConfigError(
            f"fault {fault.to_text()!r} needs at least 2 instances to draw a pair; got n_instances={n_instances}",
            field="n_instances", value=n_instances,
        )
    return tuple(range(n_instances))


@dataclass(frozen=True)
class _ShuffleTimeline:
    """How many shuffles of one ``shuffle`` fault touch one instance: ``counts[j]`` on
    [bounds_s[j], bounds_s[j + 1]), 0 before ``bounds_s[0]``; the last count is 0 and
    neighbouring counts differ (runs are maximal)."""

    link_mbps: float
    bounds_s: array = field(repr=False)  # array('d'), strictly increasing
    counts: array = field(repr=False)  # array('l'), same length, counts[-1] == 0
    raw_count: int = 0  # shuffles touching this instance

    def count(self, t_s: float) -> int:
        j = bisect_right(self.bounds_s, t_s) - 1
        return self.counts[j] if j >= 0 else 0

    def runs(self) -> list[tuple[float, float, int]]:
        """(start_s, end_s, count) for the runs with count >= 1."""
        return [
            (self.bounds_s[j], self.bounds_s[j + 1], self.counts[j])
            for j in range(len(self.counts) - 1) if self.counts[j] > 0
        ]

    @classmethod
    def build(
        cls, fault: Shuffle, seed: int, position: int, horizon_s: float, candidates: tuple[int, ...], instance: int
    ) -> _ShuffleTimeline | None:
        """``instance``'s timeline, or None when no shuffle touches it."""
        per_slot = _shuffles_per_slot(fault.duration_s, horizon_s)
        me = candidates.index(instance)
        grid = np.zeros(per_slot + 1, np.int64)  # (n+1,) shuffles touching me on [k·d, (k+1)·d)
        for slot in range(fault.concurrent):
            pairs = _shuffle_pairs(seed, position, slot, len(candidates), per_slot)  # (n, 2)
            grid[:-1] += (pairs == me).any(axis=1)  # (n, 2) -> (n,); a slot touches me at most once
        if not grid.any():
            return None
        change = np.flatnonzero(np.diff(grid, prepend=0))  # (runs+1,) k where the count changes
        bounds_s = change * fault.duration_s  # (runs+1,) boundary k sits at k·d
        counts = array("l", grid[change].tolist())
        return cls(fault.link_mbps, array("d", bounds_s.tolist()), counts, int(grid.sum()))


def _shuffle_timelines(
    spec: FaultSpec, instance: int, horizon_s: float, n_instances: int | None
) -> tuple[_ShuffleTimeline, ...]:
    """Timelines of the shuffle faults whose candidates include ``instance`` and touch it."""
    timelines = []
    for position, fault in enumerate(spec.faults):
        if not isinstance(fault, Shuffle):
            continue
        candidates = _shuffle_candidates(fault, n_instances)
        _check_shuffle_size(fault, horizon_s)
        if instance in candidates:
            timelines.append(_ShuffleTimeline.build(fault, spec.seed, position, horizon_s, candidates, instance))
    return tuple(t for t in timelines if t is not None)


def _check_shuffle_size(fault: Shuffle, horizon_s: float) -> None:
    total = fault.concurrent * _shuffles_per_slot(fault.duration_s, horizon_s)
    if total > _MAX_EPISODES:
        raise ConfigError(
            f"shuffle: concurrent*horizon_s/duration_s = {fault.concurrent}*{horizon_s}/{fault.duration_s} = "
            f"{total:.3g} shuffles, over {_MAX_EPISODES:,}; shorten horizon_s or lengthen duration_s",
            field="horizon_s", value=horizon_s,
        )


def _merge_windows(windows: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    merged: list[tuple[float, float]] = []
    for start_s, end_s in sorted(windows):
        if merged and start_s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end_s))
        else:
            merged.append((start_s, end_s))
    return tuple(merged)


def _check_build_args(instance: int, horizon_s: float, n_instances: int | None) -> None:
    if isinstance(instance, bool) or not isinstance(instance, int) or instance < 0:
        raise ConfigError(
            f"instance must be an integer >= 0; got instance={instance!r}", field="instance", value=instance
        )
    if n_instances is not None and (
        isinstance(n_instances, bool) or not isinstance(n_instances, int) or not instance < n_instances
    ):
        raise ConfigError(
            f"n_instances must be None or an integer > instance; got n_instances={n_instances!r}, "
            f"instance={instance}", field="n_instances", value=n_instances,
        )
    if isinstance(horizon_s, bool) or not isinstance(horizon_s, (int, float)) or not 0 < horizon_s < math.inf:
        raise ConfigError(
            f"horizon_s must be a finite number > 0; got horizon_s={horizon_s!r}", field="horizon_s", value=horizon_s
        )


@dataclass(frozen=True)
class InstanceFaults:
    """The precomputed fault schedule of one instance (picklable; queries are O(log n)).

    ``t_s`` is always seconds since the run started. A worker, before answering a batch,
    exits if ``crash_at_s`` has passed, waits out ``stall_window(t_s)``, and takes
    ``service_time_s(t_s, compute_s, batch_seq, nbytes)`` to answer, where ``nbytes`` is what
    the batch moves over the instance's network link (only ``shuffle`` faults use it).
    """

    instance: int
    seed: int
    horizon_s: float
    crash_at_s: float | None = None
    slow: tuple[_SlowTimeline, ...] = ()
    stragglers: tuple[tuple[float, float], ...] = ()  # (from_s, factor)
    delays: tuple[_DelayStream, ...] = ()
    stalls: tuple[tuple[float, float], ...] = ()  # merged (start_s, end_s); end_s = inf: forever
    shuffle: tuple[_ShuffleTimeline, ...] = ()  # shuffle faults that touch this instance

    @classmethod
    def build(
        cls, spec: FaultSpec, instance: int, horizon_s: float, n_instances: int | None = None
    ) -> InstanceFaults:
        """Precompute ``instance``'s schedule for [0, horizon_s) from ``spec``.

        ``n_instances`` is the run's instance count; a ``shuffle`` without ``instances`` draws
        its pairs among all of them and raises ConfigError when it is None.
        """
        _check_build_args(instance, horizon_s, n_instances)
        seed, mine = spec.seed, spec.for_instance(instance)  # ((position, fault), ...)
        crashes = [f.at_s for _, f in mine if isinstance(f, Crash)]
        schedule = cls(
            instance=instance, seed=seed, horizon_s=float(horizon_s),
            crash_at_s=min(crashes) if crashes else None,
            slow=tuple(
                _SlowTimeline.build(f, seed, instance, p, horizon_s) for p, f in mine if isinstance(f, SlowEpisodes)
            ),
            stragglers=tuple((f.from_s, f.factor) for _, f in mine if isinstance(f, Straggler)),
            delays=tuple(_DelayStream.build(f, seed, instance, p) for p, f in mine if isinstance(f, RandomDelay)),
            stalls=_merge_windows([(f.at_s, f.end_s) for _, f in mine if isinstance(f, Stall)]),
            shuffle=_shuffle_timelines(spec, instance, horizon_s, n_instances),
        )
        log.debug("instance %d faults: %s", instance, schedule)
        return schedule

    def after_crash(self) -> InstanceFaults:
        """The schedule of the instance restarted after its injected crash: an injected crash
        fires once per run, everything else is unchanged."""
        return dataclasses.replace(self, crash_at_s=None)

    def crash_after(self, started_s: float) -> float | None:
        """When an instance (re)started at ``started_s`` crashes: a crash time already past when
        it started never fires."""
        return self.crash_at_s if self.crash_at_s is not None and self.crash_at_s > started_s else None

    def stalls_at(self, t_s: float, started_s: float) -> bool:
        """Whether an instance started at ``started_s`` is stalled at ``t_s``: only a stall that
        began after the start counts (the replacement of a stalled instance is not stalled)."""
        window = self.stall_window(t_s)
        return window is not None and window[0] >= started_s

    @property
    def empty(self) -> bool:
        """True when this instance has nothing injected (the worker can skip every query)."""
        busy = self.slow or self.stragglers or self.delays or self.stalls or self.shuffle
        return not busy and self.crash_at_s is None

    def slowdown(self, t_s: float) -> float:
        """Product of the factors active at ``t_s`` (1.0 when none)."""
        factor = 1.0
        for timeline in self.slow:
            if timeline.active(t_s):
                factor *= timeline.factor
        for from_s, straggler_factor in self.stragglers:
            if t_s >= from_s:
                factor *= straggler_factor
        return factor

    def extra_delay_s(self, t_s: float, batch_seq: int) -> float:
        """Random extra delay of this instance's batch number ``batch_seq`` (deterministic)."""
        if not self.delays:
            return 0.0
        if isinstance(batch_seq, bool) or not isinstance(batch_seq, (int, np.integer)) or not 0 <= batch_seq < 2**64:
            raise ConfigError(
                f"batch_seq must be an integer in [0, 2**64); got batch_seq={batch_seq!r}",
                field="batch_seq", value=batch_seq,
            )
        return sum(d.sample_s(int(batch_seq)) for d in self.delays)

    def transfer_s(self, t_s: float, nbytes: int) -> float:
        """Extra seconds a transfer of ``nbytes`` to or from this instance takes at ``t_s``
        because it shares the link with the s(t) shuffles touching the instance: it gets
        1/(s+1) of the link, so ``nbytes·8·s / (link_mbps·1e6)``, summed over shuffle faults."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
            raise ConfigError(f"nbytes must be an integer >= 0; got nbytes={nbytes!r}", field="nbytes", value=nbytes)
        if not nbytes or not self.shuffle:
            return 0.0
        return sum(int(nbytes) * 8 * t.count(t_s) / (t.link_mbps * 1e6) for t in self.shuffle)

    def service_time_s(self, t_s: float, compute_s: float, batch_seq: int, nbytes: int = 0) -> float:
        """How long the batch started at ``t_s`` should take: compute × slowdown + extra delay
        + the extra transfer time of its ``nbytes`` under shuffle load."""
        return compute_s * self.slowdown(t_s) + self.extra_delay_s(t_s, batch_seq) + self.transfer_s(t_s, nbytes)

    def shuffle_count(self, t_s: float) -> int:
        """How many shuffles (of all shuffle faults) touch this instance at ``t_s``."""
        return sum(t.count(t_s) for t in self.shuffle)

    def stall_window(self, t_s: float) -> tuple[float, float] | None:
        """The (start_s, end_s) stall window containing ``t_s`` (end_s = inf: forever), else None."""
        for start_s, end_s in self.stalls:
            if start_s <= t_s < end_s:
                return (start_s, end_s)
        return None

    def stalled(self, t_s: float) -> bool:
        """Whether the instance is silent at ``t_s``."""
        return self.stall_window(t_s) is not None

    def crashed(self, t_s: float) -> bool:
        """Whether the instance's process should have exited by ``t_s``."""
        return self.crash_at_s is not None and t_s >= self.crash_at_s

    def episodes(self) -> list[tuple[float, float, float]]:
        """Slow episodes (start_s, end_s, factor), merged per fault and sorted by start."""
        out = [
            (s, e, timeline.factor)
            for timeline in self.slow
            for s, e in zip(timeline.starts_s, timeline.ends_s)
        ]
        return sorted(out)

    def shuffles(self) -> list[tuple[float, float, int]]:
        """Runs (start_s, end_s, count) of a constant count >= 1 of one shuffle fault's shuffles
        touching this instance, per fault and sorted by start (runs of different faults may
        overlap; runs of one fault do not)."""
        return sorted(run for timeline in self.shuffle for run in timeline.runs())


DEFAULT_HORIZON_S = 3600.0  # fault schedules are precomputed this far; later times see no episodes


def instance_schedules(spec: FaultSpec | None, n_instances: int, horizon_s: float = DEFAULT_HORIZON_S
                       ) -> list[InstanceFaults | None]:
    """Every instance's schedule for a run of ``n_instances`` (None for all without a spec).

    This is the one place a run's FaultSpec becomes per-instance schedules: the system wiring
    hands instance i its schedule, and backends never see the spec."""
    if spec is None:
        return [None] * n_instances
    return [InstanceFaults.build(spec, i, horizon_s, n_instances=n_instances) for i in range(n_instances)]
