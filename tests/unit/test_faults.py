"""parm.faults: spec grammar and TOML, validation, and per-instance schedules (no sleeps)."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from parm.errors import ConfigError
from parm.faults import (
    FAULT_SPEC_HELP,
    Crash,
    FaultSpec,
    InstanceFaults,
    RandomDelay,
    Shuffle,
    SlowEpisodes,
    Stall,
    Straggler,
    fault_spec_from_dict,
    format_summary,
    load_fault_spec,
    parse_fault_spec,
    summarize,
)
from parm.faults.schedule import _shuffle_pairs

EXAMPLE = (
    "crash:instance=1,at_s=5;slow:rate_hz=0.5,duration_s=1,factor=20;straggler:instance=0,factor=3;"
    "delay:mean_ms=2,prob=0.1,dist=exp;stall:instance=2,at_s=3;seed=7"
)


# ---------------------------------------------------------------- grammar


def test_parse_example() -> None:
    spec = parse_fault_spec(EXAMPLE)
    assert spec.seed == 7
    assert spec.faults == (
        Crash(instance=1, at_s=5.0),
        SlowEpisodes(rate_hz=0.5, duration_s=1.0, factor=20.0),
        Straggler(instance=0, factor=3.0),
        RandomDelay(mean_ms=2.0, prob=0.1, dist="exp"),
        Stall(instance=2, at_s=3.0),
    )


def test_grammar_and_json_round_trip() -> None:
    spec = parse_fault_spec(EXAMPLE + ";delay:mean_ms=0.25,dist=uniform,instances=3|0;stall:instance=0,at_s=1,duration_s=2")
    assert parse_fault_spec(spec.to_text()) == spec
    data = json.loads(json.dumps(spec.to_json()))
    assert fault_spec_from_dict(data) == spec


def test_parse_empty_and_whitespace() -> None:
    assert parse_fault_spec("") == FaultSpec.none()
    assert parse_fault_spec("  ; ;") == FaultSpec.none()
    assert FaultSpec.none().empty
    assert parse_fault_spec("seed=3") == FaultSpec(seed=3)
    assert parse_fault_spec(" crash : instance = 1 , at_s = 2 ; ") == FaultSpec((Crash(1, 2.0),))


def test_parse_instances_list_and_inf() -> None:
    spec = parse_fault_spec("slow:rate_hz=1,duration_s=1,factor=2,instances=3|0|3;stall:instance=1,at_s=0,duration_s=inf")
    assert spec.faults[0].instances == (0, 3)
    assert spec.faults[1].duration_s is None
    assert parse_fault_spec("delay:mean_ms=1,instances=2").faults[0].instances == (2,)


def test_help_example_parses() -> None:
    example = FAULT_SPEC_HELP.split("example: ")[1].strip().strip("'")
    assert parse_fault_spec(example).seed == 7


def test_unknown_key_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_fault_spec("crash:instanse=1")
    assert str(info.value) == "fault 'crash:instanse=1': unknown key 'instanse' for crash; accepted: instance, at_s"
    assert info.value.field == "crash.instanse"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("crsh:instance=1", ["unknown kind 'crsh'", "accepted: slow, straggler, delay, crash, stall, shuffle"]),
        ("crash", ["missing required key 'instance'", "required: instance, at_s"]),
        ("crash:instance=1", ["missing required key 'at_s'"]),
        ("crash:instance=x,at_s=1", ["'instance' for crash must be an integer", "'x'"]),
        ("crash:instance=1.5,at_s=1", ["must be an integer", "'1.5'"]),
        ("crash:instance=1,at_s=soon", ["'at_s' for crash must be a number", "'soon'"]),
        ("crash:instance=-1,at_s=1", ["instance must be an instance index", "instance=-1"]),
        ("crash:instance=1,at_s=-2", ["at_s must be a finite number >= 0", "at_s=-2.0"]),
        ("crash:instance=1,at_s=nan", ["at_s must be a number"]),
        ("crash:instance", ["expected key=value", "'instance'"]),
        ("crash:instance=1,instance=2,at_s=0", ["key 'instance' given twice"]),
        ("instance=1", ["expected 'kind:key=value,...' or 'seed=N'"]),
        ("seed=x", ["seed must be an integer", "'x'"]),
        ("seed=-1", ["seed must be an integer in [0, 2**63)", "seed=-1"]),
        ("seed=1;seed=2", ["seed given twice"]),
        ("slow:rate_hz=0,duration_s=1,factor=2", ["rate_hz must be a finite number > 0", "rate_hz=0.0"]),
        ("slow:rate_hz=1,duration_s=-1,factor=2", ["duration_s must be a finite number > 0"]),
        ("slow:rate_hz=1,duration_s=1,factor=0.5", ["factor must be a finite number >= 1", "factor=0.5"]),
        ("slow:rate_hz=inf,duration_s=1,factor=2", ["rate_hz must be a finite number > 0", "inf"]),
        ("slow:rate_hz=1,duration_s=1,factor=2,instances=1|a", ["'instances' for slow must be instance indices"]),
        ("slow:rate_hz=1,duration_s=1,factor=2,instances=1|-2", ["instances must be an instance index"]),
        ("straggler:instance=0,factor=0.9", ["factor must be a finite number >= 1", "factor=0.9"]),
        ("straggler:instance=0,factor=2,from_s=-1", ["from_s must be a finite number >= 0"]),
        ("delay:mean_ms=0", ["mean_ms must be a finite number > 0", "mean_ms=0.0"]),
        ("delay:mean_ms=1,prob=1.5", ["prob must be a probability in [0, 1]", "prob=1.5"]),
        ("delay:mean_ms=1,prob=-0.1", ["prob must be a finite number >= 0"]),
        ("delay:mean_ms=1,dist=gauss", ["dist must be one of exp, const, uniform", "dist='gauss'"]),
        ("stall:instance=0,at_s=1,duration_s=0", ["duration_s must be > 0 seconds"]),
        ("shuffle:concurrent=4,duration_s=2", ["missing required key 'link_mbps'",
                                               "required: concurrent, duration_s, link_mbps"]),
        ("shuffle:concurrent=0,duration_s=2,link_mbps=10", ["concurrent must be an integer >= 1", "concurrent=0"]),
        ("shuffle:concurrent=1.5,duration_s=2,link_mbps=10", ["'concurrent' for shuffle must be an integer",
                                                              "'1.5'"]),
        ("shuffle:concurrent=4,duration_s=0,link_mbps=10", ["duration_s must be a finite number > 0", "duration_s=0.0"]),
        ("shuffle:concurrent=4,duration_s=inf,link_mbps=10", ["duration_s must be a finite number > 0", "inf"]),
        ("shuffle:concurrent=4,duration_s=2,link_mbps=-1", ["link_mbps must be a finite number > 0", "link_mbps=-1.0"]),
        ("shuffle:concurrent=4,duration_s=2,link_mbps=10,instances=3",
         ["instances must be a list of at least 2 instance indices", "instances=[3]"]),
        ("shuffle:concurrent=4,duration_s=2,link_mbps=10,rate_hz=1",
         ["unknown key 'rate_hz' for shuffle", "accepted: concurrent, duration_s, link_mbps, instances"]),
    ],
)
def test_parse_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fault_spec("crash:instance=0,at_s=9;" + text)
    message = str(info.value)
    assert message.startswith("fault '")
    for fragment in fragments:
        assert fragment in message, message


def test_parse_shuffle() -> None:
    spec = parse_fault_spec("shuffle:concurrent=4,duration_s=2,link_mbps=10,instances=2|0|1;seed=3")
    assert spec.faults == (Shuffle(concurrent=4, duration_s=2.0, link_mbps=10.0, instances=(0, 1, 2)),)
    (fault,) = spec.faults
    assert isinstance(fault.concurrent, int) and isinstance(fault.link_mbps, float)
    assert parse_fault_spec(spec.to_text()) == spec
    assert fault_spec_from_dict(json.loads(json.dumps(spec.to_json()))) == spec
    assert parse_fault_spec("shuffle:concurrent=1,duration_s=0.5,link_mbps=100").faults[0].instances is None
    assert "shuffle:concurrent=C,duration_s=D,link_mbps=L" in FAULT_SPEC_HELP


def test_shuffle_from_dict_and_toml(tmp_path: Path) -> None:
    native = {"seed": 3, "fault": [{"kind": "shuffle", "concurrent": 4, "duration_s": 2, "link_mbps": 10}]}
    strings = {"seed": 3, "fault": [{"kind": "shuffle", "concurrent": "4", "duration_s": "2", "link_mbps": "10"}]}
    expected = FaultSpec((Shuffle(4, 2.0, 10.0),), seed=3)
    assert fault_spec_from_dict(native) == fault_spec_from_dict(strings) == expected
    path = tmp_path / "shuffle.toml"
    path.write_text('seed = 3\n[[fault]]\nkind = "shuffle"\nconcurrent = 4\nduration_s = 2.0\nlink_mbps = 10\n'
                    'instances = [3, 1]\n')
    assert load_fault_spec(path) == FaultSpec((Shuffle(4, 2.0, 10.0, instances=(1, 3)),), seed=3)
    path.write_text('[[fault]]\nkind = "shuffle"\nconcurrent = 4.0\nduration_s = 2\nlink_mbps = 10\n')
    with pytest.raises(ConfigError, match=r"'concurrent' for shuffle must be an integer; got 4\.0"):
        load_fault_spec(path)


def test_shuffle_validates_directly() -> None:
    with pytest.raises(ConfigError, match="concurrent must be an integer >= 1; got concurrent=True") as info:
        Shuffle(concurrent=True, duration_s=1.0, link_mbps=10.0)  # type: ignore[arg-type]
    assert info.value.field == "shuffle.concurrent"
    with pytest.raises(ConfigError, match="link_mbps must be a number"):
        Shuffle(1, 1.0, "10")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 2 instance indices"):
        Shuffle(1, 1.0, 10.0, instances=[4, 4])
    assert Shuffle(2, 1, 10, instances=[5, 1]).instances == (1, 5)
    assert FaultSpec((Shuffle(2, 1, 10, instances=[0, 5]),)).out_of_range(5) == (Shuffle(2, 1, 10, instances=(0, 5)),)


def test_errors_name_the_item() -> None:
    with pytest.raises(ConfigError, match=r"^fault 'straggler:instance=0,factor=0.5': straggler: factor") as info:
        parse_fault_spec("crash:instance=0,at_s=1;straggler:instance=0,factor=0.5")
    assert (info.value.field, info.value.value) == ("straggler.factor", 0.5)


def test_dataclasses_validate_directly() -> None:
    with pytest.raises(ConfigError, match="crash: instance must be an instance index"):
        Crash(instance=True, at_s=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="a number"):
        Crash(instance=0, at_s="5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-empty list"):
        SlowEpisodes(1.0, 1.0, 2.0, instances=())
    with pytest.raises(ConfigError, match="faults must be"):
        FaultSpec(faults=("crash",))  # type: ignore[arg-type]
    assert SlowEpisodes(1, 1, 2, instances=[2, 1]).instances == (1, 2)
    assert Stall(0, 1, duration_s=math.inf).duration_s is None


def test_check_instances() -> None:
    spec = parse_fault_spec("crash:instance=4,at_s=1;delay:mean_ms=1,instances=0|5")
    assert [f.KIND for f in spec.out_of_range(5)] == ["delay"]
    spec.check_instances(6)
    with pytest.raises(ConfigError, match=r"outside 0\.\.4 \(this mode runs 5 instances\)"):
        spec.check_instances(5)


# ---------------------------------------------------------------- TOML and dicts


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(
        'seed = 7\n'
        '[[fault]]\nkind = "crash"\ninstance = 1\nat_s = 5\n'
        '[[fault]]\nkind = "slow"\nrate_hz = 0.5\nduration_s = 1.0\nfactor = 20\ninstances = [0, 2]\n'
        '[[fault]]\nkind = "delay"\nmean_ms = "2"\nprob = 0.1\n'
    )
    spec = load_fault_spec(path)
    assert spec == FaultSpec(
        (Crash(1, 5.0), SlowEpisodes(0.5, 1.0, 20.0, instances=(0, 2)), RandomDelay(2.0, prob=0.1)), seed=7
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('[[fault]]\nkind = "crash"\ninstanse = 1\nat_s = 1\n', "fault #1 (kind='crash'): unknown key 'instanse'"),
        ('[[fault]]\ninstance = 1\n', "fault #1 (kind=None): missing 'kind'"),
        ('[[fault]]\nkind = "crash"\ninstance = 1.5\nat_s = 1\n', "must be an integer; got 1.5"),
        ('[[fault]]\nkind = "crash"\ninstance = true\nat_s = 1\n', "must be an integer; got True"),
        ('[[fault]]\nkind = "slow"\nrate_hz = 1\nduration_s = 1\nfactor = [2]\n', "must be a number; got [2]"),
        ('seeds = 3\n', "unknown key 'seeds'; accepted: seed, fault"),
        ('seed = "x"\n', "seed must be an integer"),
        ('fault = 3\n', "'fault' must be a list of tables"),
        ('seed = = 3\n', "is not valid TOML"),
    ],
)
def test_load_toml_errors(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_fault_spec(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_fault_spec(tmp_path / "nope.toml")


def test_from_dict_accepts_both_list_names() -> None:
    entries = [{"kind": "crash", "instance": 0, "at_s": 1}]
    assert fault_spec_from_dict({"fault": entries}) == fault_spec_from_dict({"faults": entries})
    with pytest.raises(ConfigError, match="not both"):
        fault_spec_from_dict({"fault": entries, "faults": entries})


# ---------------------------------------------------------------- schedules


def _slow_spec(rate_hz: float, duration_s: float, factor: float = 5.0, seed: int = 1) -> FaultSpec:
    return FaultSpec((SlowEpisodes(rate_hz, duration_s, factor),), seed=seed)


def test_episodes_deterministic_per_instance_and_seed() -> None:
    spec = _slow_spec(0.5, 1.0)
    first = InstanceFaults.build(spec, 0, 500.0).episodes()
    assert first == InstanceFaults.build(spec, 0, 500.0).episodes()
    assert first != InstanceFaults.build(spec, 1, 500.0).episodes()
    assert first != InstanceFaults.build(_slow_spec(0.5, 1.0, seed=2), 0, 500.0).episodes()
    assert len(first) > 100


def test_longer_horizon_extends_episodes() -> None:
    spec = _slow_spec(1.0, 0.2)
    short = InstanceFaults.build(spec, 3, 100.0).episodes()
    long = InstanceFaults.build(spec, 3, 10_000.0).episodes()
    assert long[: len(short)] == short
    assert all(start < 10_000.0 for start, _, _ in long)


def test_episode_starts_are_poisson_with_the_rate() -> None:
    rate_hz = 2.0
    # durations far shorter than the gaps, so (almost) no episodes merge and starts are visible
    schedule = InstanceFaults.build(_slow_spec(rate_hz, 1e-9), 0, 20_000.0)
    starts = np.array([start for start, _, _ in schedule.episodes()])  # (n,)
    gaps = np.diff(starts)  # (n-1,)
    assert gaps.mean() == pytest.approx(1 / rate_hz, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate_hz, rel=0.05)  # exponential: std == mean
    assert len(starts) == pytest.approx(rate_hz * 20_000.0, rel=0.03)


def test_slowed_fraction_matches_merged_poisson_episodes() -> None:
    rate_hz, duration_s, horizon_s = 0.5, 1.0, 20_000.0
    row = summarize(_slow_spec(rate_hz, duration_s), 1, horizon_s)["per_instance"][0]
    stationary = 1 - math.exp(-rate_hz * duration_s)
    assert row["slowed_fraction_expected"] == pytest.approx(stationary, rel=0.01)
    assert row["slowed_fraction"] == pytest.approx(stationary, rel=0.05)


def test_slowdown_inside_and_outside_episodes() -> None:
    schedule = InstanceFaults.build(_slow_spec(0.2, 0.5, factor=4.0), 0, 1_000.0)
    episodes = schedule.episodes()
    for start_s, end_s, factor in episodes[:20]:
        assert factor == 4.0
        assert schedule.slowdown(start_s) == 4.0
        assert schedule.slowdown((start_s + end_s) / 2) == 4.0
        assert schedule.slowdown(end_s) == 1.0  # half-open [start, end)
        assert schedule.slowdown(np.nextafter(start_s, -math.inf)) == 1.0
    assert schedule.slowdown(-1.0) == 1.0
    assert schedule.slowdown(episodes[-1][1] + 1e6) == 1.0  # past the horizon: nothing


def test_overlapping_episodes_of_one_fault_merge() -> None:
    schedule = InstanceFaults.build(_slow_spec(2.0, 3.0, factor=10.0), 0, 200.0)
    (slow,) = schedule.slow
    assert slow.raw_count > 3 * len(slow.starts_s)  # many starts fell inside earlier episodes
    episodes = schedule.episodes()
    assert all(end_s < next_start for (_, end_s, _), (next_start, _, _) in zip(episodes, episodes[1:]))
    assert all(end_s - start_s >= 3.0 for start_s, end_s, _ in episodes)
    assert {schedule.slowdown(t) for t in np.linspace(0.0, 200.0, 2001)} <= {1.0, 10.0}


def test_factors_of_different_faults_multiply() -> None:
    spec = FaultSpec(
        (SlowEpisodes(0.5, 2.0, 3.0), SlowEpisodes(0.5, 2.0, 5.0), Straggler(0, 2.0, from_s=50.0)), seed=4
    )
    schedule = InstanceFaults.build(spec, 0, 100.0)
    first, second = schedule.slow
    seen = set()
    for t_s in np.linspace(0.0, 99.99, 10_000):
        expected = (3.0 if first.active(t_s) else 1.0) * (5.0 if second.active(t_s) else 1.0)
        expected *= 2.0 if t_s >= 50.0 else 1.0
        assert schedule.slowdown(t_s) == expected
        seen.add(expected)
    assert 15.0 in seen and 30.0 in seen  # both episodes overlapped, with and without the straggler


def test_slow_instances_filter() -> None:
    spec = FaultSpec((SlowEpisodes(1.0, 1.0, 2.0, instances=(1,)),))
    assert InstanceFaults.build(spec, 0, 100.0).episodes() == []
    assert InstanceFaults.build(spec, 0, 100.0).empty
    assert InstanceFaults.build(spec, 1, 100.0).episodes()


def test_straggler_from_s() -> None:
    spec = parse_fault_spec("straggler:instance=2,factor=3,from_s=10")
    schedule = InstanceFaults.build(spec, 2, 60.0)
    assert schedule.slowdown(9.999) == 1.0
    assert schedule.slowdown(10.0) == 3.0
    assert schedule.slowdown(1e9) == 3.0
    assert InstanceFaults.build(spec, 1, 60.0).slowdown(20.0) == 1.0


def _delays_ms(spec: FaultSpec, instance: int, batches: int) -> np.ndarray:
    schedule = InstanceFaults.build(spec, instance, 10.0)
    return np.array([schedule.extra_delay_s(0.0, n) * 1e3 for n in range(batches)])  # (batches,)


def test_delay_prob_and_mean() -> None:
    delays_ms = _delays_ms(parse_fault_spec("delay:mean_ms=2,prob=0.1,dist=exp;seed=3"), 0, 40_000)
    delayed = delays_ms[delays_ms > 0]
    assert delayed.size / delays_ms.size == pytest.approx(0.1, abs=0.01)
    assert delayed.mean() == pytest.approx(2.0, rel=0.06)
    assert delayed.std() == pytest.approx(2.0, rel=0.1)


def test_delay_distributions() -> None:
    const = _delays_ms(parse_fault_spec("delay:mean_ms=3,dist=const"), 0, 100)
    assert np.all(const == pytest.approx(3.0))
    uniform = _delays_ms(parse_fault_spec("delay:mean_ms=3,dist=uniform"), 0, 20_000)
    assert uniform.min() >= 0 and uniform.max() < 6.0
    assert uniform.mean() == pytest.approx(3.0, rel=0.03)
    assert not _delays_ms(parse_fault_spec("delay:mean_ms=3,prob=0"), 0, 1000).any()


def test_delay_is_a_pure_function_of_batch_seq() -> None:
    spec = parse_fault_spec("delay:mean_ms=2;seed=5")
    schedule = InstanceFaults.build(spec, 1, 10.0)
    assert schedule.extra_delay_s(0.0, 17) == schedule.extra_delay_s(9.0, 17)
    assert schedule.extra_delay_s(0.0, 17) == InstanceFaults.build(spec, 1, 99.0).extra_delay_s(0.0, 17)
    assert schedule.extra_delay_s(0.0, 17) != schedule.extra_delay_s(0.0, 18)
    assert not np.array_equal(_delays_ms(spec, 0, 50), _delays_ms(spec, 1, 50))
    with pytest.raises(ConfigError, match="batch_seq"):
        schedule.extra_delay_s(0.0, -1)


def test_service_time() -> None:
    spec = parse_fault_spec("straggler:instance=0,factor=4;delay:mean_ms=5,dist=const")
    schedule = InstanceFaults.build(spec, 0, 10.0)
    assert schedule.service_time_s(1.0, 0.01, 0) == pytest.approx(0.01 * 4 + 0.005)
    plain = InstanceFaults.build(FaultSpec.none(), 0, 10.0)
    assert plain.empty
    assert plain.service_time_s(1.0, 0.01, 7) == 0.01


def test_crash_timing() -> None:
    spec = parse_fault_spec("crash:instance=1,at_s=5;crash:instance=1,at_s=3")
    schedule = InstanceFaults.build(spec, 1, 10.0)
    assert schedule.crash_at_s == 3.0
    assert not schedule.crashed(2.999) and schedule.crashed(3.0)
    assert InstanceFaults.build(spec, 0, 10.0).crash_at_s is None


def test_stall_timing() -> None:
    spec = parse_fault_spec("stall:instance=2,at_s=3;stall:instance=1,at_s=1,duration_s=2;stall:instance=1,at_s=2.5,duration_s=1")
    forever = InstanceFaults.build(spec, 2, 10.0)
    assert not forever.stalled(2.999)
    assert forever.stall_window(3.0) == (3.0, math.inf)
    assert forever.stalled(1e9)
    windowed = InstanceFaults.build(spec, 1, 10.0)
    assert windowed.stalls == ((1.0, 3.5),)  # overlapping windows merge
    assert windowed.stall_window(0.5) is None
    assert windowed.stall_window(2.0) == (1.0, 3.5)
    assert not windowed.stalled(3.5)
    assert not InstanceFaults.build(spec, 0, 10.0).stalled(5.0)


def test_pickle_round_trip() -> None:
    spec = parse_fault_spec(EXAMPLE)
    assert pickle.loads(pickle.dumps(spec)) == spec
    schedule = InstanceFaults.build(spec, 1, 300.0)
    copy = pickle.loads(pickle.dumps(schedule))
    assert copy == schedule
    assert copy.episodes() == schedule.episodes()
    assert [copy.service_time_s(t, 0.01, n) for n, t in enumerate(range(0, 300, 7))] == [
        schedule.service_time_s(t, 0.01, n) for n, t in enumerate(range(0, 300, 7))
    ]


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="horizon_s must be a finite number > 0"):
        InstanceFaults.build(FaultSpec.none(), 0, 0.0)
    with pytest.raises(ConfigError, match="instance must be an integer >= 0"):
        InstanceFaults.build(FaultSpec.none(), -1, 1.0)
    with pytest.raises(ConfigError, match="shorten horizon_s"):
        InstanceFaults.build(_slow_spec(1e4, 1e-6), 0, 1e4)


def test_summarize() -> None:
    spec = parse_fault_spec(EXAMPLE + ";crash:instance=9,at_s=1")
    summary = summarize(spec, 4, 600.0)
    assert summary["seed"] == 7 and summary["instances"] == 4
    assert summary["out_of_range"] == ["crash:instance=9,at_s=1"]
    rows = summary["per_instance"]
    assert [row["instance"] for row in rows] == [0, 1, 2, 3]
    assert rows[0]["slowed_fraction"] == 1.0  # the straggler
    assert rows[1]["crash_at_s"] == 5.0
    assert rows[2]["stall_windows"] == [[3.0, math.inf]]
    assert rows[3]["delay_prob"] == pytest.approx(0.1)
    assert rows[3]["delay_mean_ms"] == pytest.approx(0.2)
    assert rows[3]["slow_episodes"] > 0
    assert rows[0]["mean_slowdown_expected"] > rows[3]["mean_slowdown_expected"] > 1.0
    text = format_summary(summary)
    assert "instance 3" in text and "seed=7" in text
    assert format_summary(summarize(FaultSpec.none(), 2, 10.0)) == "faults: none"


# ---------------------------------------------------------------- shuffles


def _shuffle_spec(concurrent: int, duration_s: float = 0.5, link_mbps: float = 10.0, seed: int = 1,
                  instances: tuple[int, ...] | None = None) -> FaultSpec:
    return FaultSpec((Shuffle(concurrent, duration_s, link_mbps, instances=instances),), seed=seed)


def _all_schedules(spec: FaultSpec, n: int, horizon_s: float) -> list[InstanceFaults]:
    return [InstanceFaults.build(spec, i, horizon_s, n_instances=n) for i in range(n)]


def test_shuffle_schedule_is_global() -> None:
    n, concurrent, duration_s, horizon_s = 6, 4, 0.5, 200.0
    spec = _shuffle_spec(concurrent, duration_s)
    schedules = _all_schedules(spec, n, horizon_s)
    shuffles = int(horizon_s / duration_s)
    pairs = np.stack([_shuffle_pairs(1, 0, c, n, shuffles) for c in range(concurrent)])  # (C, J, 2)
    assert np.all(pairs[..., 0] != pairs[..., 1])
    for j in range(shuffles):
        for t_s in (j * duration_s, (j + 0.5) * duration_s):
            counts = [s.shuffle_count(t_s) for s in schedules]  # (n,)
            assert sum(counts) == 2 * concurrent  # every slot's pair is two distinct instances
            for i in range(n):
                members = int((pairs[:, j] == i).any(axis=1).sum())  # slots whose pair at j holds i
                assert counts[i] == members
    assert all(s.shuffle_count(horizon_s + 1.0) == 0 and s.shuffle_count(-1.0) == 0 for s in schedules)


def test_one_shuffle_touches_exactly_its_pair() -> None:
    n, duration_s = 5, 0.25
    schedules = _all_schedules(_shuffle_spec(1, duration_s, seed=9), n, 100.0)
    seen = set()
    for j in range(400):
        counts = [s.shuffle_count((j + 0.5) * duration_s) for s in schedules]
        assert sorted(counts) == [0, 0, 0, 1, 1]  # both members of the pair, nobody else
        seen.add(tuple(i for i, c in enumerate(counts) if c))
    assert len(seen) == n * (n - 1) // 2  # every unordered pair turns up: the pair changes over time


def test_shuffle_touches_each_instance_uniformly() -> None:
    n, concurrent = 8, 4
    schedules = _all_schedules(_shuffle_spec(concurrent, 1.0, seed=2), n, 5_000.0)
    shares = np.array([s.shuffle[0].raw_count for s in schedules]) / (concurrent * 5_000)  # (n,)
    assert shares == pytest.approx(np.full(n, 2 / n), rel=0.08)


def test_shuffle_deterministic_and_horizon_extends() -> None:
    spec = _shuffle_spec(4, 0.5, seed=5)
    short = InstanceFaults.build(spec, 2, 100.0, n_instances=6)
    long = InstanceFaults.build(spec, 2, 10_000.0, n_instances=6)
    assert short == InstanceFaults.build(spec, 2, 100.0, n_instances=6)
    assert long.shuffles()[: len(short.shuffles()) - 1] == short.shuffles()[:-1]
    assert all(short.shuffle_count(t) == long.shuffle_count(t) for t in np.linspace(0.0, 99.99, 5_000))
    assert short.shuffles() != InstanceFaults.build(_shuffle_spec(4, 0.5, seed=6), 2, 100.0, 6).shuffles()
    # the draw depends on the candidate set, not on whether it was named or implied by n_instances
    named = _shuffle_spec(4, 0.5, seed=5, instances=(0, 1, 2, 3, 4, 5))
    assert InstanceFaults.build(named, 2, 100.0).shuffles() == short.shuffles()


def test_shuffle_runs_are_maximal_and_match_counts() -> None:
    schedule = InstanceFaults.build(_shuffle_spec(3, 0.5, seed=4), 1, 300.0, n_instances=4)
    runs = schedule.shuffles()
    assert runs and all(1 <= count <= 3 for _, _, count in runs)
    for (start_s, end_s, count), (next_start, _, next_count) in zip(runs, runs[1:]):
        assert start_s < end_s <= next_start
        assert end_s < next_start or count != next_count
    for start_s, end_s, count in runs[:50]:
        assert schedule.shuffle_count(start_s) == count
        assert schedule.shuffle_count(np.nextafter(end_s, -math.inf)) == count


def test_transfer_s_with_two_instances() -> None:
    nbytes, link_mbps = 1_250_000, 10.0  # 10 Mb over a 10 Mb/s link: 1 s alone
    for concurrent in (1, 3):
        spec = _shuffle_spec(concurrent, 2.0, link_mbps)
        for schedule in _all_schedules(spec, 2, 60.0):  # two instances: every shuffle is theirs
            assert not schedule.empty
            assert schedule.shuffles() == [(0.0, 60.0, concurrent)]
            for t_s in (0.0, 1.0, 2.0, 59.9):
                assert schedule.transfer_s(t_s, nbytes) == pytest.approx(nbytes * 8 * concurrent / (link_mbps * 1e6))
            assert schedule.transfer_s(1.0, 0) == 0.0
            assert schedule.transfer_s(61.0, nbytes) == 0.0  # past the horizon
            assert schedule.service_time_s(1.0, 0.01, 0) == 0.01  # no bytes: no transfer time
            assert schedule.service_time_s(1.0, 0.01, 0, nbytes) == pytest.approx(0.01 + concurrent)
    both = FaultSpec((Shuffle(1, 2.0, 10.0), Shuffle(2, 1.0, 20.0)))
    schedule = InstanceFaults.build(both, 0, 60.0, n_instances=2)
    assert schedule.transfer_s(5.0, nbytes) == pytest.approx(1.0 + 2 * 0.5)  # extras of two faults add up
    with pytest.raises(ConfigError, match="nbytes must be an integer >= 0; got nbytes=-1"):
        schedule.transfer_s(1.0, -1)
    assert InstanceFaults.build(FaultSpec.none(), 0, 10.0).transfer_s(1.0, nbytes) == 0.0


def test_shuffle_candidates_and_n_instances() -> None:
    spec = _shuffle_spec(2, 1.0)
    with pytest.raises(ConfigError, match="pass n_instances") as info:
        InstanceFaults.build(spec, 0, 10.0)
    assert info.value.field == "n_instances"
    with pytest.raises(ConfigError, match="needs at least 2 instances to draw a pair; got n_instances=1"):
        InstanceFaults.build(spec, 0, 10.0, n_instances=1)
    with pytest.raises(ConfigError, match="n_instances must be None or an integer > instance"):
        InstanceFaults.build(spec, 3, 10.0, n_instances=3)
    named = _shuffle_spec(1, 1.0, instances=(0, 2))
    assert InstanceFaults.build(named, 1, 10.0).empty  # not a candidate: no shuffle load
    assert InstanceFaults.build(named, 3, 10.0, n_instances=4).transfer_s(1.0, 10**6) == 0.0
    assert InstanceFaults.build(named, 2, 10.0).shuffles() == [(0.0, 10.0, 1)]
    assert InstanceFaults.build(FaultSpec.none(), 0, 10.0, n_instances=1).empty


def test_shuffle_pickle_round_trip() -> None:
    spec = parse_fault_spec(EXAMPLE + ";shuffle:concurrent=4,duration_s=0.5,link_mbps=10")
    schedule = InstanceFaults.build(spec, 1, 300.0, n_instances=6)
    copy = pickle.loads(pickle.dumps(schedule))
    assert copy == schedule and copy.shuffles() == schedule.shuffles()
    times = np.linspace(0.0, 299.0, 997)
    assert [copy.service_time_s(t, 0.01, n, 50_000) for n, t in enumerate(times)] == [
        schedule.service_time_s(t, 0.01, n, 50_000) for n, t in enumerate(times)
    ]
    assert any(copy.transfer_s(t, 50_000) > 0 for t in times)


def test_shuffle_summary() -> None:
    n, concurrent = 6, 4
    summary = summarize(_shuffle_spec(concurrent, 1.0, 10.0, seed=3), n, 5_000.0)
    expected = 1 - (1 - 2 / n) ** concurrent
    for row in summary["per_instance"]:
        assert row["shuffled_fraction_expected"] == pytest.approx(expected)
        assert row["shuffled_fraction"] == pytest.approx(expected, abs=0.03)
        assert row["transfer_ms_per_mb_expected"] == pytest.approx(8e3 * (2 * concurrent / n) / 10.0)
        assert row["transfer_ms_per_mb"] == pytest.approx(row["transfer_ms_per_mb_expected"], rel=0.05)
        assert row["shuffles"] == pytest.approx(concurrent * 5_000 * 2 / n, rel=0.08)
    assert "in shuffles" in format_summary(summary)
    named = summarize(_shuffle_spec(1, 1.0, instances=(0, 1)), 2, 50.0, n_instances=3)
    assert [row["shuffled_fraction"] for row in named["per_instance"]] == [1.0, 1.0]
    wider = summarize(_shuffle_spec(1, 1.0), 1, 50.0, n_instances=4)["per_instance"][0]
    assert wider["shuffled_fraction_expected"] == pytest.approx(0.5)
    assert "in shuffles" not in format_summary(summarize(_slow_spec(0.5, 1.0), 2, 10.0))
    with pytest.raises(ConfigError, match="n_instances must be an integer >= instances=3"):
        summarize(_shuffle_spec(1, 1.0), 3, 10.0, n_instances=2)


# ---------------------------------------------------------------- trials


def test_for_trial() -> None:
    spec = parse_fault_spec(EXAMPLE)
    trials = [spec.for_trial(t) for t in range(200)]
    assert all(t.faults == spec.faults for t in trials)
    seeds = [t.seed for t in trials]
    assert len(set(seeds)) == 200 and spec.seed not in seeds
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert spec.for_trial(3) == parse_fault_spec(EXAMPLE).for_trial(3)  # deterministic
    assert spec.for_trial(np.int64(3)) == spec.for_trial(3)
    assert FaultSpec(spec.faults, seed=8).for_trial(3).seed != spec.for_trial(3).seed
    assert FaultSpec(seed=2**63 - 1).for_trial(0).seed < 2**63
    first, second = (InstanceFaults.build(spec.for_trial(t), 3, 500.0) for t in (0, 1))
    assert first.episodes() != second.episodes()  # trials see independent realisations
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="trial must be an integer >= 0"):
            spec.for_trial(bad)  # type: ignore[arg-type]
