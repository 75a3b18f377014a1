"""build_model(arch, ...): the built-in architectures and user factories ``module.path:factory``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping

from torch import nn

from parm.errors import ConfigError
from parm.models.lenet import LeNet5
from parm.models.mlp import MLP, TileMLP
from parm.models.resnet import ResNet18

Factory = Callable[..., nn.Module]


def _resnet_for(side: int) -> Factory:
    def build(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        if tuple(in_shape[1:]) != (side, side):
            raise ConfigError(
                f"this ResNet-18 variant is for {side}x{side} inputs; got {in_shape[1]}x{in_shape[2]} "
                f"(use 'resnet18' for 32x32 and 'resnet18-28' for 28x28)",
                field="in_shape", value=tuple(in_shape),
            )
        return ResNet18(in_shape, num_classes)

    return build


ARCHITECTURES: dict[str, Factory] = {
    "mlp": MLP,
    "mlp-small": lambda in_shape, num_classes: MLP(in_shape, num_classes, hidden=(32,)),
    "tile-mlp": TileMLP,  # parity model of the tiles code (needs k)
    "lenet5": LeNet5,
    "resnet18": _resnet_for(32),
    "resnet18-28": _resnet_for(28),
}


def _import_factory(spec: str) -> Factory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"unknown architecture {spec!r}: use one of {', '.join(ARCHITECTURES)} "
            f"or a factory as 'module.path:function'",
            field="arch", value=spec,
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} for architecture {spec!r}: {exc}; "
            f"is it installed or on PYTHONPATH?",
            field="arch", value=spec,
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{module_name!r} has no callable {attr!r} (architecture {spec!r})", field="arch", value=spec)
    return factory


def _call_factory(factory: Factory, in_shape: tuple[int, ...], num_classes: int, k: int | None = None) -> nn.Module:
    try:
        params: Mapping[str, inspect.Parameter] = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {
        name: value
        for name, value in (("in_shape", tuple(in_shape)), ("num_classes", num_classes), ("k", k))
        if (accepts_kwargs or name in params) and value is not None
    }
    return factory(**kwargs)


def check_arch(arch: str) -> None:
    """Fail now (ConfigError listing the built-in names) if ``arch`` is neither a built-in
    architecture nor an importable factory — before any data is loaded."""
    if arch not in ARCHITECTURES:
        _import_factory(arch)


def build_model(arch: str, in_shape: tuple[int, ...], num_classes: int, *, k: int | None = None) -> nn.Module:
    """Build an untrained model.

    ``arch`` is a built-in name (``mlp``, ``lenet5``, ``resnet18``, ``resnet18-28``,
    ``tile-mlp``) or ``module.path:factory``; a factory gets ``in_shape`` and ``num_classes``
    (and ``k``, the coding group size, when given: parity models of the ``tiles`` code) as
    keyword arguments if its signature takes them.
    """
    factory = ARCHITECTURES.get(arch) or _import_factory(arch)
    try:
        model = _call_factory(factory, in_shape, num_classes, k)
    except ValueError as exc:  # a built-in refusing these shapes
        if arch not in ARCHITECTURES:
            raise
        raise ConfigError(f"architecture {arch!r}: {exc}", field="arch", value=arch) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"architecture {arch!r} returned {type(model).__name__}, not a torch.nn.Module",
            field="arch", value=arch,
        )
    return model
