"""Fault injection at a model instance: specs, parsing, and per-instance schedules.

A serving mode parses a :class:`FaultSpec` (CLI grammar via :func:`parse_fault_spec`, TOML via
:func:`load_fault_spec`), builds one :class:`InstanceFaults` per instance with
:func:`instance_schedules` (in the system wiring) and hands it to that instance, whose worker
asks it, before answering each batch, how long the batch takes and whether to crash or stall.
Schedules depend only on (spec, seed, instance index, time since the run started) and, for
``shuffle`` faults drawn among all instances, the run's instance count, so every serving mode
sees the same faults. :meth:`FaultSpec.for_trial` gives each benchmark trial its own realisation.
"""

from parm.faults.grammar import FAULT_SPEC_HELP, load_fault_spec, parse_fault_spec
from parm.faults.schedule import DEFAULT_HORIZON_S, InstanceFaults, instance_schedules
from parm.faults.spec import (
    DISTS,
    FAULT_KINDS,
    Crash,
    Fault,
    FaultSpec,
    RandomDelay,
    Shuffle,
    SlowEpisodes,
    Stall,
    Straggler,
    fault_spec_from_dict,
)
from parm.faults.summary import format_summary, summarize

__all__ = [
    "DEFAULT_HORIZON_S",
    "DISTS",
    "FAULT_KINDS",
    "FAULT_SPEC_HELP",
    "Crash",
    "Fault",
    "FaultSpec",
    "InstanceFaults",
    "RandomDelay",
    "Shuffle",
    "SlowEpisodes",
    "Stall",
    "Straggler",
    "fault_spec_from_dict",
    "format_summary",
    "instance_schedules",
    "load_fault_spec",
    "parse_fault_spec",
    "summarize",
]
