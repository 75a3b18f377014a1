"""The coding-group tracker: which batch is answered how, and when.

Pure bookkeeping (no I/O, no asyncio, no threads): the frontend reports events and executes
the actions the tracker returns. A *group* is up to k data batches (in arrival order) plus
its r parity batches. A group is *closed* when it has k members, or earlier when the frontend
stops waiting for more (low load): the empty positions are then *filler* — zero queries whose
outputs the frontend supplies (the known F(0)), so decoding works the same way.

Each *pool* (tenant grouping; ``None`` when off) has its own open group, so a group's members
all come from one pool and no query reaches the answers of another pool's queries.

Events: ``add`` (a data batch joins its pool's open group), ``close`` (no more members),
``on_output`` (a data batch's original output), ``on_parity`` (a parity output),
``on_failure`` (a data batch's instance died or stalled), ``on_parity_failure``, ``on_unusable``
(a batch answered with an output unfit for decoding), ``expire`` (the query deadline passed).

Actions: ``Answer(batch, outputs, source)``, ``Cancel(batch)`` (drop the original if it is
still queued; ignore it if it arrives), ``Resend(batch)`` (send the batch again).

Invariants:

1. Every added batch is answered exactly once (original, retried, reconstructed or error).
2. A reconstruction uses only outputs that really arrived — originals, parity outputs and
   filler outputs — never another reconstruction. With r parities a group decodes up to r
   unknown data outputs (``CodeConfig.decodable``; with the ``tiles`` code, one parity output
   decodes every member).
3. A decode happens as soon as it is possible: when the group is closed and the number of
   members with no output is at least 1 and at most what the parity outputs in can decode.
4. Each batch answered by reconstruction gets exactly one ``Cancel``; its late original is
   dropped (counted in ``late_originals``).
5. ``Resend`` is emitted only for a failed batch its group can no longer decode (another
   member — failed, reconstructed or expired — or the parity is also unavailable); a batch
   its group can still decode waits for the decoder.
6. A group leaves the tracker once all its members are answered; later events about it or
   its batches change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from parm.coding import CodeConfig, decode, member_prediction, subtract
from parm.serving.types import Source


@dataclass(frozen=True)
class Answer:
    batch_id: int
    outputs: torch.Tensor | None  # (B, C); None for Source.ERROR
    source: Source


@dataclass(frozen=True)
class Cancel:
    batch_id: int


@dataclass(frozen=True)
class Resend:
    batch_id: int


Action = Answer | Cancel | Resend


@dataclass
class _Member:
    batch_id: int
    output: torch.Tensor | None = None  # (B, C) original output once it arrived
    answered: bool = False
    failed: bool = False  # its instance died/stalled; waiting for decode or re-send
    resent: bool = False


@dataclass
class _Group:
    gid: int
    opened_s: float
    members: list[_Member] = field(default_factory=list)
    closed: bool = False
    filler: torch.Tensor | None = None  # (B, C): output of a zero query, for empty positions
    parity: list[torch.Tensor | None] = field(default_factory=list)  # r entries, (B, C) each
    parity_failed: list[bool] = field(default_factory=list)


class GroupTracker:
    """Tracks coding groups and decides answers, cancellations and re-sends (see module doc)."""

    def __init__(self, code: CodeConfig, clock: Callable[[], float]) -> None:
        self.code = code
        self.clock = clock
        self._groups: dict[int, _Group] = {}
        self._where: dict[int, tuple[int, int]] = {}  # batch_id -> (gid, position)
        self._open: dict[Hashable, _Group] = {}  # pool -> its open (not yet full) group
        self._next_gid = 0
        self.late_originals = 0
        self.reconstructions = 0

    # ---- membership ---------------------------------------------------------------------
    def add(self, batch_id: int, pool: Hashable = None) -> tuple[int, int, bool]:
        """Put a data batch in its pool's open group: -> (gid, position, group_is_now_full)."""
        if batch_id in self._where:
            raise ValueError(f"batch {batch_id} is already tracked")
        group = self._open.get(pool)
        if group is None:
            group = self._open[pool] = _Group(self._next_gid, self.clock(), parity=[None] * self.code.r,
                                              parity_failed=[False] * self.code.r)
            self._groups[self._next_gid] = group
            self._next_gid += 1
        group.members.append(_Member(batch_id))
        self._where[batch_id] = (group.gid, len(group.members) - 1)
        full = len(group.members) == self.code.k
        if full:
            group.closed = True
            del self._open[pool]
        return group.gid, len(group.members) - 1, full

    def open_group_age_s(self, pool: Hashable = None) -> float | None:
        """Seconds since the pool's open (not yet full) group got its first member; None if none."""
        group = self._open.get(pool)
        return None if group is None else self.clock() - group.opened_s

    def open_group(self, pool: Hashable = None) -> int | None:
        """The gid of the pool's open group, if it has one."""
        group = self._open.get(pool)
        return None if group is None else group.gid

    def close(self, filler: torch.Tensor, pool: Hashable = None) -> tuple[int, list[int]] | None:
        """Close the pool's open group early; ``filler`` (B, C) is the output of a zero query.

        Returns (gid, member batch ids) so the frontend can encode the partial group, or None.
        """
        group = self._open.pop(pool, None)
        if group is None:
            return None
        group.closed, group.filler = True, filler
        if all(m.answered for m in group.members):  # nothing left to protect: no parity needed
            self._retire(group)
            return None
        return group.gid, [m.batch_id for m in group.members]

    def has_group(self, gid: int) -> bool:
        """True while the group is tracked (some member still unanswered, or it is still open)."""
        return gid in self._groups

    def group_of(self, batch_id: int) -> int | None:
        where = self._where.get(batch_id)
        return None if where is None else where[0]

    def is_answered(self, batch_id: int) -> bool:
        """True once the batch got its answer (or left the tracker)."""
        where = self._where.get(batch_id)
        return where is None or self._groups[where[0]].members[where[1]].answered

    def pending_batches(self) -> list[int]:
        return [m.batch_id for g in self._groups.values() for m in g.members if not m.answered]

    def __len__(self) -> int:
        """Groups still tracked."""
        return len(self._groups)

    # ---- events -------------------------------------------------------------------------
    def on_output(self, batch_id: int, output: torch.Tensor, *, retried: bool = False) -> list[Action]:
        """The deployed model's output (B, C) of a data batch arrived (``retried``: from a re-sent copy)."""
        member, group = self._lookup(batch_id)
        if member is None or group is None:
            self.late_originals += 1
            return []
        member.output = output
        actions: list[Action] = []
        if member.answered:
            self.late_originals += 1
        else:
            member.answered = True
            actions.append(Answer(batch_id, output, Source.RETRIED if member.resent or retried else Source.ORIGINAL))
        return self._after_change(group, actions)

    def on_parity(self, gid: int, index: int, output: torch.Tensor) -> list[Action]:
        """Parity ``index`` (0..r-1) of group ``gid`` produced its output (B, C)."""
        group = self._groups.get(gid)
        if group is None:
            return []
        group.parity[index] = output
        return self._after_change(group, [])

    def on_failure(self, batch_id: int) -> list[Action]:
        """The instance holding this data batch died or stalled."""
        member, group = self._lookup(batch_id)
        if member is None or group is None or member.answered or member.output is not None:
            return []
        member.failed = True
        actions = self._after_change(group, [])
        if not member.answered and not self._can_still_decode(group):
            actions += self._resend_failed(group)
        return actions

    def on_unusable(self, batch_id: int) -> list[Action]:
        """The batch was answered outside its group with an output that must not be used to decode
        (not finite): it counts as answered and unavailable, like a reconstructed member."""
        member, group = self._lookup(batch_id)
        if member is None or group is None:
            return []
        member.answered, member.output = True, None
        actions = [] if self._can_still_decode(group) else self._resend_failed(group)
        return self._after_change(group, actions)

    def on_parity_failure(self, gid: int, index: int) -> list[Action]:
        """The instance computing parity ``index`` of group ``gid`` died or stalled."""
        group = self._groups.get(gid)
        if group is None:
            return []
        group.parity_failed[index] = True
        actions = [] if self._can_still_decode(group) else self._resend_failed(group)
        return self._after_change(group, actions)

    def expire(self, batch_id: int) -> list[Action]:
        """The batch's deadline passed: answer it with an error (if it has no answer yet)."""
        member, group = self._lookup(batch_id)
        if member is None or group is None or member.answered:
            return []
        member.answered = True
        actions: list[Action] = [Answer(batch_id, None, Source.ERROR)]
        if not self._can_still_decode(group):  # an expired member no longer helps decode the others
            actions += self._resend_failed(group)
        return self._after_change(group, actions)

    # ---- rules --------------------------------------------------------------------------
    def _lookup(self, batch_id: int) -> tuple[_Member | None, _Group | None]:
        where = self._where.get(batch_id)
        if where is None:
            return None, None
        group = self._groups[where[0]]
        return group.members[where[1]], group

    def _after_change(self, group: _Group, actions: list[Action]) -> list[Action]:
        actions += self._try_decode(group)
        if all(m.answered for m in group.members) and group.closed:
            self._retire(group)
        return actions

    def _unknown(self, group: _Group) -> list[int]:
        return [i for i, m in enumerate(group.members) if m.output is None]

    def _try_decode(self, group: _Group) -> list[Action]:
        unknown = self._unknown(group)
        have_parity = [i for i, p in enumerate(group.parity) if p is not None]
        if not group.closed or not unknown or len(unknown) > self.code.decodable(len(have_parity)):
            return []
        if all(group.members[i].answered for i in unknown):
            return []
        decoded = self._decode(group, unknown)  # (k, B, C)
        actions: list[Action] = []
        for i in unknown:
            member = group.members[i]
            if not member.answered:
                member.answered = True
                self.reconstructions += 1
                actions += [Answer(member.batch_id, decoded[i], Source.RECONSTRUCTED), Cancel(member.batch_id)]
        return actions

    def _known(self, group: _Group, position: int) -> torch.Tensor:
        if position < len(group.members):
            out = group.members[position].output
            assert out is not None
            return out
        assert group.filler is not None, "a closed partial group has a filler output"
        return group.filler

    def _decode(self, group: _Group, unknown: list[int]) -> torch.Tensor | list[torch.Tensor | None]:
        """Outputs by position (k entries; those in ``unknown`` decoded)."""
        if self.code.per_query:  # the tiles code: each missing member is its slice of the parity output
            parity_out = group.parity[0]
            assert parity_out is not None
            return [member_prediction(self.code, parity_out, i) if i in unknown else None for i in range(self.code.k)]
        if self.code.r == 1 and len(unknown) == 1:  # the common case: plain subtraction
            j = unknown[0]
            known = [self._known(group, i) for i in range(self.code.k) if i != j]
            parity = group.parity[0]
            assert parity is not None
            return [subtract(self.code, parity, known, j) if i == j else None for i in range(self.code.k)]
        some = next(p for p in group.parity if p is not None)  # (B, C)
        outputs = []
        for i in range(self.code.k):
            if i < len(group.members):
                out = group.members[i].output
                outputs.append(out if out is not None else torch.zeros_like(some))
            else:
                assert group.filler is not None, "a closed partial group has a filler output"
                outputs.append(group.filler)
        data_out = torch.stack(outputs, dim=1)  # k × (B, C) -> (B, k, C)
        available = torch.ones(data_out.shape[0], self.code.k, dtype=torch.bool)  # (B, k)
        available[:, unknown] = False
        parity = torch.stack([p if p is not None else torch.zeros_like(some) for p in group.parity], dim=1)  # (B, r, C)
        parity_ok = torch.tensor([p is not None for p in group.parity]).expand(data_out.shape[0], -1)  # (B, r)
        return decode(self.code, data_out, available, parity, parity_ok).transpose(0, 1)  # (k, B, C)

    def _can_still_decode(self, group: _Group) -> bool:
        """Could the group's failed members still be decoded once pending outputs arrive?

        Unavailable: members without an output that failed, or that were answered without one
        (reconstructed — their cancelled original may never come — or failed by deadline).
        """
        unavailable = sum(1 for m in group.members if m.output is None and (m.failed or m.answered))
        usable_parity = sum(1 for p, bad in zip(group.parity, group.parity_failed) if p is not None or not bad)
        return unavailable <= self.code.decodable(usable_parity)

    def _resend_failed(self, group: _Group) -> list[Action]:
        actions: list[Action] = []
        for member in group.members:
            if member.failed and not member.answered:
                member.resent = True
                member.failed = False
                actions.append(Resend(member.batch_id))
        return actions

    def _retire(self, group: _Group) -> None:
        for member in group.members:
            self._where.pop(member.batch_id, None)
        self._groups.pop(group.gid, None)
