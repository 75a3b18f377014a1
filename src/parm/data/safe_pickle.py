"""Data-only pickle decoding: plain data and numpy arrays out of a pickle, without running pickle.

``pickle.load`` (even with a restricted ``find_class``) still calls the
callables a file names, and DESIGN forbids unpickling untrusted files. So this module never
calls ``pickle.load``. It walks the opcodes with :func:`pickletools.genops` (a parser that only
decodes) and runs a tiny stack machine that knows a fixed, data-only subset: containers, str,
bytes, numbers, memo, and exactly the globals that numpy and Python 3 use to pickle an
ndarray (``numpy[._]core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``,
``numpy[._]core.numeric._frombuffer``, ``_codecs.encode`` with latin-1). Those globals are
never imported or called; they are recognised by name and the array is rebuilt here with
``np.frombuffer``. Any other global or opcode raises DataError, so a crafted file cannot run code.
"""

from __future__ import annotations

import math
import pickletools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from parm.errors import DataError


@dataclass(frozen=True)
class _Global:
    """A global named by the pickle; recognised by name, never imported."""

    module: str
    name: str


_RECONSTRUCT = {_Global("numpy.core.multiarray", "_reconstruct"), _Global("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {_Global("numpy.core.numeric", "_frombuffer"), _Global("numpy._core.numeric", "_frombuffer")}
_NDARRAY = _Global("numpy", "ndarray")
_DTYPE = _Global("numpy", "dtype")
_CODECS_ENCODE = _Global("_codecs", "encode")
_ALLOWED_GLOBALS = _RECONSTRUCT | _FROMBUFFER | {_NDARRAY, _DTYPE, _CODECS_ENCODE}


class _PendingDtype:
    """numpy.dtype(name) waiting for its BUILD state (byte order)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def build(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2:
            raise ValueError(f"dtype state must be a tuple; got {state!r}")
        if len(state) > 3 and state[3] is not None:
            raise ValueError("structured dtypes are not supported")
        byteorder = state[1]
        if byteorder in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(byteorder)


class _PendingArray:
    """numpy.core.multiarray._reconstruct(ndarray, ...) waiting for its BUILD state."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def build(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("ndarray state must be a tuple of 4 or 5 items")
        shape, dtype, is_fortran, raw = state[-4:]
        self.array = _array_from_bytes(raw, _unwrap(dtype), shape, "F" if is_fortran else "C")


def _array_from_bytes(raw: Any, dtype: Any, shape: Any, order: Literal["C", "F"]) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise ValueError(f"array dtype must be a plain numpy dtype; got {dtype!r}")
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"array data must be bytes; got {type(raw).__name__}")
    shape = tuple(int(n) for n in shape)
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"array of shape {shape} {dtype} needs {count * dtype.itemsize} bytes; found {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order=order).copy()


def _unwrap(value: Any) -> Any:
    if isinstance(value, _PendingDtype):
        return value.dtype
    if isinstance(value, _PendingArray):
        if value.array is None:
            raise ValueError("array was never given its state")
        return value.array
    return value


def _finalize(value: Any) -> Any:
    """Replace pending dtypes/arrays inside containers by the real objects."""
    if isinstance(value, dict):
        return {_finalize(k): _finalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finalize(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_finalize(v) for v in value)
    return _unwrap(value)


def _reduce(func: Any, args: Any) -> Any:
    """Apply one of the recognised globals to its arguments, re-implemented here."""
    if not isinstance(args, tuple):
        raise ValueError("REDUCE arguments must be a tuple")
    if func in _RECONSTRUCT:
        if len(args) != 3 or args[0] != _NDARRAY:
            raise ValueError(f"unexpected _reconstruct arguments {args!r}")
        return _PendingArray()
    if func == _DTYPE:
        name = args[0].decode("latin-1") if isinstance(args[0], bytes) else args[0]
        if not isinstance(name, str):
            raise ValueError(f"dtype name must be a string; got {name!r}")
        return _PendingDtype(np.dtype(name))
    if func in _FROMBUFFER:
        buf, dtype, shape, order = args
        return _array_from_bytes(bytes(buf), _unwrap(dtype), shape, order)
    if func == _CODECS_ENCODE:
        text, encoding = args
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise ValueError(f"only _codecs.encode(str, 'latin1') is allowed; got encoding {encoding!r}")
        return text.encode("latin-1")
    raise ValueError(f"cannot apply {func!r}")


class _DataOnlyUnpickler:
    """A stack machine over pickletools.genops for the data-only opcode subset."""

    def __init__(self, path: Path, hint: str) -> None:
        self.path = path
        self.hint = hint
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def run(self, content: bytes) -> Any:
        for opcode, arg, _pos in pickletools.genops(content):
            if opcode.name == "STOP":
                return _finalize(self.stack.pop())
            handler = _HANDLERS.get(opcode.name)
            if handler is None:
                raise DataError(
                    f"{self.path}: refusing to decode pickle opcode {opcode.name} (not plain data). {self.hint}",
                    path=self.path,
                )
            handler(self, arg)
        raise ValueError("pickle ended without STOP")

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def mark(self, _arg: Any) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def global_(self, module: str, name: str) -> None:
        found = _Global(module, name)
        if found not in _ALLOWED_GLOBALS:
            raise DataError(
                f"{self.path}: refusing to load {module}.{name} from a pickle; plain data only needs "
                f"numpy arrays. {self.hint}",
                path=self.path,
            )
        self.push(found)

    def build(self, _arg: Any) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (_PendingArray, _PendingDtype)):
            raise ValueError(f"BUILD on unsupported object {type(target).__name__}")
        target.build(state)


def _setitems(vm: _DataOnlyUnpickler, _arg: Any) -> None:
    items = vm.pop_mark()
    target = vm.stack[-1]
    if not isinstance(target, dict):
        raise ValueError("SETITEMS on a non-dict")
    for i in range(0, len(items), 2):
        target[items[i]] = items[i + 1]


def _setitem(vm: _DataOnlyUnpickler, _arg: Any) -> None:
    value, key = vm.stack.pop(), vm.stack.pop()
    if not isinstance(vm.stack[-1], dict):
        raise ValueError("SETITEM on a non-dict")
    vm.stack[-1][key] = value


def _append(vm: _DataOnlyUnpickler, _arg: Any) -> None:
    value = vm.stack.pop()
    if not isinstance(vm.stack[-1], list):
        raise ValueError("APPEND on a non-list")
    vm.stack[-1].append(value)


def _appends(vm: _DataOnlyUnpickler, _arg: Any) -> None:
    items = vm.pop_mark()
    if not isinstance(vm.stack[-1], list):
        raise ValueError("APPENDS on a non-list")
    vm.stack[-1].extend(items)


def _tuple_n(n: int) -> Callable[[_DataOnlyUnpickler, Any], None]:
    def handler(vm: _DataOnlyUnpickler, _arg: Any) -> None:
        items = tuple(vm.stack[len(vm.stack) - n :]) if n else ()
        del vm.stack[len(vm.stack) - n :]
        vm.push(items)

    return handler


def _reduce_op(vm: _DataOnlyUnpickler, _arg: Any) -> None:
    args = vm.stack.pop()
    func = vm.stack.pop()
    vm.push(_reduce(func, args))


def _stack_global(vm: _DataOnlyUnpickler, _arg: Any) -> None:
    name, module = vm.stack.pop(), vm.stack.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise ValueError("STACK_GLOBAL needs two strings")
    vm.global_(module, name)


def _push_arg(vm: _DataOnlyUnpickler, arg: Any) -> None:
    vm.push(arg)


def _push_py2_str(vm: _DataOnlyUnpickler, arg: str) -> None:
    vm.push(arg.encode("latin-1"))  # Python 2 str: bytes, as pickle.load(encoding="bytes") gives


def _put(vm: _DataOnlyUnpickler, arg: int) -> None:
    vm.memo[arg] = vm.stack[-1]


_HANDLERS: dict[str, Callable[[_DataOnlyUnpickler, Any], object]] = {  # return values are ignored
    "PROTO": lambda vm, arg: None,
    "FRAME": lambda vm, arg: None,
    "MARK": _DataOnlyUnpickler.mark,
    "POP": lambda vm, arg: vm.stack.pop(),
    "POP_MARK": lambda vm, arg: vm.pop_mark(),
    "NONE": lambda vm, arg: vm.push(None),
    "NEWTRUE": lambda vm, arg: vm.push(True),
    "NEWFALSE": lambda vm, arg: vm.push(False),
    "EMPTY_DICT": lambda vm, arg: vm.push({}),
    "EMPTY_LIST": lambda vm, arg: vm.push([]),
    "EMPTY_TUPLE": lambda vm, arg: vm.push(()),
    "DICT": lambda vm, arg: vm.push(dict(_pairs(vm.pop_mark()))),
    "LIST": lambda vm, arg: vm.push(vm.pop_mark()),
    "TUPLE": lambda vm, arg: vm.push(tuple(vm.pop_mark())),
    "TUPLE1": _tuple_n(1),
    "TUPLE2": _tuple_n(2),
    "TUPLE3": _tuple_n(3),
    "SETITEM": _setitem,
    "SETITEMS": _setitems,
    "APPEND": _append,
    "APPENDS": _appends,
    "PUT": _put,
    "BINPUT": _put,
    "LONG_BINPUT": _put,
    "MEMOIZE": lambda vm, arg: _put(vm, len(vm.memo)),
    "GET": lambda vm, arg: vm.push(vm.memo[arg]),
    "BINGET": lambda vm, arg: vm.push(vm.memo[arg]),
    "LONG_BINGET": lambda vm, arg: vm.push(vm.memo[arg]),
    "GLOBAL": lambda vm, arg: vm.global_(*arg.split(" ", 1)),
    "STACK_GLOBAL": _stack_global,
    "REDUCE": _reduce_op,
    "BUILD": _DataOnlyUnpickler.build,
    "STRING": _push_py2_str,
    "BINSTRING": _push_py2_str,
    "SHORT_BINSTRING": _push_py2_str,
    "BYTEARRAY8": lambda vm, arg: vm.push(bytearray(arg)),
    **{name: _push_arg for name in (
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
        "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
        "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    )},
}


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]


def safe_unpickle(content: bytes, path: Path, *, hint: str = "") -> Any:
    """Decode a pickle of plain data and numpy arrays without executing anything (see module doc).

    Raises DataError naming ``path`` (and ending with ``hint``: what the user can do) for
    anything outside that subset or a malformed pickle.
    """
    try:
        return _DataOnlyUnpickler(path, hint).run(content)
    except DataError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as exc:
        raise DataError(f"{path}: not a readable pickle of plain data ({exc}). {hint}", path=path) from exc
