"""Reading fault specs: the one-line CLI grammar and TOML files.

Grammar (``parm serve --faults``)::

    spec  := item (";" item)*          empty string: no faults
    item  := kind ":" key "=" value ("," key "=" value)*  |  "seed=" N
    value := number | word | index ("|" index)*    (lists: instances=0|2|3)

TOML::

    seed = 7
    [[fault]]
    kind = "crash"
    instance = 1
    at_s = 5.0
"""

from __future__ import annotations

import sys
from pathlib import Path

from parm.errors import ConfigError
from parm.faults.spec import FaultSpec, _check_seed, fault_from_params, fault_spec_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FAULT_SPEC_HELP = """\
faults separated by ';', each KIND:KEY=VALUE,KEY=VALUE (instance lists use '|'); 'seed=N' sets the seed.
  slow:rate_hz=R,duration_s=D,factor=F[,instances=0|1]   background-load episodes (Poisson, per instance)
  straggler:instance=I,factor=F[,from_s=T]               one instance always F times slower
  delay:mean_ms=M[,dist=exp|const|uniform,prob=P,instances=..]  random extra delay per batch
  crash:instance=I,at_s=T                                the instance's process exits at T
  stall:instance=I,at_s=T[,duration_s=D]                 alive but silent from T (for D s; default forever)
  shuffle:concurrent=C,duration_s=D,link_mbps=L[,instances=0|1|2]  C network shuffles at a time, each D s
                                                         between a random pair; transfers share the L Mb/s link
example: 'crash:instance=1,at_s=5;slow:rate_hz=0.5,duration_s=1,factor=20;seed=7'"""


def _parse_pairs(item: str, body: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in body.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"fault {item!r}: expected key=value; got {pair!r}", field="faults", value=pair)
        if key in params:
            raise ConfigError(f"fault {item!r}: key {key!r} given twice", field=key, value=value.strip())
        params[key] = value.strip()
    return params


def _parse_seed(item: str) -> int:
    raw = item.partition("=")[2].strip()
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"fault {item!r}: seed must be an integer; got {raw!r}", field="seed", value=raw) from None
    return _check_seed(value, f"fault {item!r}")


def _is_seed(item: str) -> bool:
    return ":" not in item and item.partition("=")[0].strip() == "seed"


def _parse_item(item: str) -> object:
    kind, colon, body = item.partition(":")
    kind = kind.strip()
    if not colon and "=" in item:
        raise ConfigError(
            f"fault {item!r}: expected 'kind:key=value,...' or 'seed=N'", field="faults", value=item
        )
    return fault_from_params(kind, _parse_pairs(item, body), f"fault {item!r}")


def parse_fault_spec(text: str) -> FaultSpec:
    """Parse the CLI grammar (see :data:`FAULT_SPEC_HELP`); ``""`` gives no faults.

    Raises ConfigError naming the item and key, with the accepted kinds or keys.
    """
    faults, seed = [], None
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        if not _is_seed(item):
            faults.append(_parse_item(item))
        elif seed is not None:
            raise ConfigError(f"fault {item!r}: seed given twice", field="seed", value=item)
        else:
            seed = _parse_seed(item)
    return FaultSpec(faults=tuple(faults), seed=seed or 0)  # type: ignore[arg-type]


def load_fault_spec(path: str | Path) -> FaultSpec:
    """Read a TOML fault file: top-level ``seed = N`` and ``[[fault]]`` tables with ``kind``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"fault spec file {str(path)!r} does not exist", field="path", value=str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"fault spec file {str(path)!r} is not valid TOML: {err}", field="path", value=str(path)) from err
    return fault_spec_from_dict(data, source=str(path))
