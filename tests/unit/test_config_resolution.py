"""One place resolves the serving configuration (``parm.system.resolve_system``) and every
default is stated once: in ServingConfig / SystemSpec, the simulator's named constants, or an
experiment file. Checkpoints here are bare ``record.json`` files (resolution reads no weights)."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import parm
from parm import cli
from parm.bench.experiment import demo_experiment, load_experiment
from parm.bench.simulate import (
    SIM_DEADLINE_MS,
    SIM_MAX_PENDING_QUERIES,
    SIM_QUERY_SHAPE,
    SIM_STALL_TIMEOUT_MS,
    sim_serving_config,
)
from parm.checkpoint import RECORD_FILE, ModelRecord
from parm.errors import CheckpointMismatchError, ConfigError
from parm.faults import parse_fault_spec
from parm.serving import ServingConfig
from parm.system import SystemSpec, resolve_system

SRC = Path(parm.__file__).parent
REPO = SRC.parent.parent
FIELDS = {f.name for f in dataclasses.fields(ServingConfig)} | {f.name for f in dataclasses.fields(SystemSpec)}
DEFAULTS = {f.name: f.default for cls in (ServingConfig, SystemSpec) for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
FLAG_FIELDS = {"max_pending": "max_pending_queries"}  # options whose name is not their field's
SERVING_COMMANDS = {"serve", "demo", "bench", "simulate", None}  # None: a helper, or a parser built in a loop
SHAPE = (1, 28, 28)


def _record(path: Path, **fields) -> Path:
    base = dict(kind="base", arch="mlp", in_shape=SHAPE, num_classes=10, dataset="mnist", mean=(0.1,), std=(0.3,),
                weights_sha256="b" * 64)
    record = ModelRecord(**{**base, **fields})
    path.mkdir(parents=True)
    (path / RECORD_FILE).write_text(json.dumps(record.to_json()))
    return path


@pytest.fixture()
def ckpts(tmp_path: Path) -> dict[str, Path]:
    return {"base": _record(tmp_path / "base"),
            "parity": _record(tmp_path / "k3", kind="parity", k=3, r=1, encoder="concat", base_sha256="b" * 64),
            "cheap": _record(tmp_path / "cheap", arch="mlp-small")}


# ---- a default is stated once -----------------------------------------------------------------------------
class _LiteralDefaults(ast.NodeVisitor):
    """Finds a serving or system field's default stated outside its dataclass: an argparse
    option's ``default=<literal>``, ``.get("<field>", <literal>)``, ``"<field>": <literal>`` in a
    dict display (a deliberate other value is a named constant), or ``<field>=<its default>`` in a
    ServingConfig / SystemSpec / resolve_system call."""

    def __init__(self, path: Path) -> None:
        self.path, self.command, self.found = path, None, []

    def _literal(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value is not None or (
            isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant))

    def _hit(self, node: ast.AST, name: str) -> None:
        self.found.append(f"{self.path.relative_to(SRC)}:{node.lineno}: {name}")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer, self.command = self.command, None
        self.generic_visit(node)
        self.command = outer

    def visit_Assign(self, node: ast.Assign) -> None:
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_parser":
            first = call.args[0] if call.args else None
            self.command = first.value if isinstance(first, ast.Constant) else None
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "add_argument" and self.command in SERVING_COMMANDS:
            options = {a.value.lstrip("-").replace("-", "_") for a in node.args if isinstance(a, ast.Constant)}
            options |= {kw.value.value for kw in node.keywords
                        if kw.arg == "dest" and isinstance(kw.value, ast.Constant)}
            fields = {FLAG_FIELDS.get(o, o) for o in options} & FIELDS
            for kw in node.keywords:
                if kw.arg == "default" and fields and self._literal(kw.value):
                    self._hit(node, f"option {sorted(fields)} with default {ast.unparse(kw.value)}")
        if name == "get" and len(node.args) == 2 and isinstance(node.args[0], ast.Constant):
            if node.args[0].value in FIELDS and self._literal(node.args[1]):
                self._hit(node, f".get({node.args[0].value!r}, {ast.unparse(node.args[1])})")
        if name in ("ServingConfig", "SystemSpec", "resolve_system", "serving_config"):
            for kw in node.keywords:  # a literal equal to the field's default restates it; a mode is a choice
                if kw.arg in DEFAULTS and kw.arg != "mode" and self._literal(kw.value) and (
                        ast.literal_eval(kw.value) == DEFAULTS[kw.arg]):
                    self._hit(node, f"{name}({kw.arg}={ast.unparse(kw.value)})")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and key.value in FIELDS and self._literal(value):
                self._hit(node, f"{{{key.value!r}: {ast.unparse(value)}}}")
        self.generic_visit(node)


@pytest.mark.parametrize("path", [SRC / "cli.py", *sorted((SRC / "bench").glob("*.py"))], ids=lambda p: p.name)
def test_no_serving_default_is_stated_twice(path: Path) -> None:
    visitor = _LiteralDefaults(path)
    visitor.visit(ast.parse(path.read_text()))
    assert not visitor.found, "defaults restated outside ServingConfig / SystemSpec:\n" + "\n".join(visitor.found)


def test_the_checker_finds_restated_defaults(tmp_path: Path) -> None:
    path = SRC / "bench" / "example.py"  # only named for the message; the text is parsed from here
    text = ('p = sub.add_parser("serve")\np.add_argument("--deadline-ms", type=float, default=10_000.0)\n'
            'x = exp.system.get("stall_timeout_ms", 2000.0)\ny = {"max_pending_queries": 1_000_000}\n'
            'z = ServingConfig(shape, dispatch="shared")\n'
            'q = sub.add_parser("train-parity")\nq.add_argument("--encoder", default="add")\n')
    visitor = _LiteralDefaults(path)
    visitor.visit(ast.parse(text))
    assert [f.split(": ", 1)[1] for f in visitor.found] == [
        "option ['deadline_ms'] with default 10000.0", ".get('stall_timeout_ms', 2000.0)",
        "{'max_pending_queries': 1000000}", "ServingConfig(dispatch='shared')"]  # train-parity is not serving


# ---- resolution -------------------------------------------------------------------------------------------
def test_serve_with_nothing_given_is_the_dataclass_defaults(ckpts: dict[str, Path]) -> None:
    base, parity = str(ckpts["base"]), str(ckpts["parity"])
    args = cli._parser().parse_args(["serve", "--base", base, "--parity", parity])
    # every field not given is its dataclass default; k and the encoder are the parity checkpoint's
    assert cli._system_spec(args) == SystemSpec(base=base, parity=parity,
                                                serving=ServingConfig(SHAPE, k=3, encoder="concat"))
    args = cli._parser().parse_args(["serve", "--base", base, "--mode", "none"])
    assert cli._system_spec(args) == SystemSpec(base=base, serving=ServingConfig(SHAPE, mode="none"))
    with pytest.raises(ConfigError, match="needs a parity checkpoint"):  # the default mode is coded
        cli._system_spec(cli._parser().parse_args(["serve", "--base", base]))


def test_serve_options_reach_the_spec(ckpts: dict[str, Path]) -> None:
    args = cli._parser().parse_args(["serve", "--base", str(ckpts["base"]), "--mode", "hedge", "--k", "4",
                                     "--instances", "3", "--deadline-ms", "250", "--max-pending", "7",
                                     "--dispatch", "round_robin", "--emulated-ms", "1.5"])
    spec = cli._system_spec(args)
    assert (spec.instances, spec.emulated_ms, spec.serving.mode, spec.serving.k) == (3, 1.5, "hedge", 4)
    assert (spec.serving.deadline_ms, spec.serving.max_pending_queries, spec.serving.dispatch) == (
        250.0, 7, "round_robin")
    assert spec.serving.batch_wait_ms == ServingConfig.default("batch_wait_ms")


def test_help_reads_the_defaults_from_the_dataclasses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {ServingConfig.default('deadline_ms')})" in text
    assert f"(default: {SystemSpec.default('instances')})" in text


def test_k_and_encoder_come_from_the_parity_checkpoint_unless_given(ckpts: dict[str, Path]) -> None:
    spec = resolve_system(ckpts["base"], parity=ckpts["parity"])
    assert (spec.serving.mode, spec.serving.k, spec.serving.encoder) == ("coded", 3, "concat")
    assert spec.serving.code is spec.serving.code and (spec.serving.code.k, spec.serving.code.r) == (3, 1)
    with pytest.raises(CheckpointMismatchError) as info:
        resolve_system(ckpts["base"], parity=ckpts["parity"], serving={"k": 2})
    assert info.value.field == "k"
    assert resolve_system(ckpts["base"], mode="none").serving.k == ServingConfig.default("k")  # no parity: default


def test_only_given_values_override_and_are_converted(ckpts: dict[str, Path]) -> None:
    spec = resolve_system(ckpts["base"], cheap=ckpts["cheap"], mode="cheap", instances=3, emulated_ms=2,
                          serving={"deadline_ms": 500, "batch_wait_ms": None, "max_pending_queries": 1e3})
    assert spec.serving.deadline_ms == 500.0 and isinstance(spec.serving.deadline_ms, float)
    assert spec.serving.max_pending_queries == 1000 and isinstance(spec.serving.max_pending_queries, int)
    assert spec.serving.batch_wait_ms == ServingConfig.default("batch_wait_ms")
    assert (spec.instances, spec.emulated_ms, spec.cheap) == (3, 2.0, str(ckpts["cheap"]))
    assert spec.roles() == ["data"] * 3 + ["cheap"] * 2 and spec.role_counts() == {"cheap": 2, "data": 3}
    with pytest.raises(ConfigError, match=r"unknown serving setting\(s\) \['deadline_s'\]; valid: .*deadline_ms"):
        resolve_system(ckpts["base"], serving={"deadline_s": 1})
    with pytest.raises(ConfigError, match="deadline_ms must be of type float"):
        resolve_system(ckpts["base"], serving={"deadline_ms": "soon"})


def test_a_cheap_model_for_other_queries_is_refused(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    other = _record(tmp_path / "other", num_classes=100)
    with pytest.raises(CheckpointMismatchError, match="num_classes"):
        resolve_system(ckpts["base"], cheap=other, mode="cheap")


def test_the_simulator_states_its_own_limits_once() -> None:
    config = sim_serving_config("coded", settings={"k": 3, "dispatch": "round_robin"})
    assert config == ServingConfig(SIM_QUERY_SHAPE, mode="coded", k=3, dispatch="round_robin",
                                   deadline_ms=SIM_DEADLINE_MS, stall_timeout_ms=SIM_STALL_TIMEOUT_MS,
                                   max_pending_queries=SIM_MAX_PENDING_QUERIES)
    assert sim_serving_config("none", settings={"deadline_ms": 100.0}).deadline_ms == 100.0  # [simulate] wins


# ---- experiment files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, key", [("system", "deadline_s"), ("system", "backend"), ("simulate", "k"),
                                          ("simulate", "stall_timeout")])
def test_unknown_experiment_keys_name_the_key_the_file_and_the_valid_keys(tmp_path: Path, section: str,
                                                                           key: str) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(f'[{section}]\n{key} = 1\n')
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert str(path) in message and key in message and "valid:" in message and "deadline_ms" in message
    assert info.value.field == f"{section}.{key}"


def test_every_serving_field_is_a_valid_system_key(tmp_path: Path) -> None:
    settable = {f.name for f in dataclasses.fields(ServingConfig)} - {"query_shape", "mode"}
    path = tmp_path / "exp.toml"
    path.write_text("[system]\n" + "".join(f"{name} = 1\n" for name in sorted(settable)))
    assert set(load_experiment(path).system) == settable


def test_demo_experiment_is_packaged_and_holds_the_demo_defaults() -> None:
    exp = demo_experiment()
    assert (REPO / "experiments" / "demo.toml").read_bytes() == (SRC / "bench" / "demo.toml").read_bytes()
    assert exp.modes == ("none", "equal", "coded", "coded-hedge", "hedge", "replicate", "cheap")
    assert exp.system == {"instances": 2, "emulated_ms": 5.0}
    assert exp.load == {"queries": 2000, "rate": 150, "warmup": 200, "trials": 3, "seed": 0}
    assert exp.faults == parse_fault_spec("slow:rate_hz=0.1,duration_s=1,factor=20;crash:instance=1,at_s=8;seed=1")


def test_a_folder_of_r_parity_checkpoints_gives_r_and_one_role_per_parity_model(tmp_path: Path,
                                                                                 ckpts: dict[str, Path]) -> None:
    folder = tmp_path / "k2-r2"
    for i in range(2):
        _record(folder / f"parity-{i}", kind="parity", k=2, r=2, parity_index=i, encoder="add", base_sha256="b" * 64)
    spec = resolve_system(ckpts["base"], parity=folder, mode="coded-hedge", instances=2, zones=("a", "b"))
    assert (spec.serving.k, spec.serving.r, spec.serving.mode) == (2, 2, "coded-hedge")
    assert spec.roles() == ["data", "data", "parity", "parity1"]  # cost m + ceil(m·r/k)
    from parm.system import instance_specs

    specs = instance_specs(spec)
    assert [s.model.checkpoint for s in specs[2:]] == [str(folder / "parity-0"), str(folder / "parity-1")]
    assert [s.zone for s in specs] == ["a", "b", "a", "b"]
    with pytest.raises(ConfigError, match="r=1 was asked but .* holds 2 parity model"):
        resolve_system(ckpts["base"], parity=folder, serving={"r": 1})
    equal = resolve_system(ckpts["base"], mode="equal", instances=2, serving={"k": 2, "r": 2})
    assert equal.roles() == ["data"] * 4  # the same cost as coded with r = 2
