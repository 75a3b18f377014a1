"""Backends: the interface the frontend talks to, and the embedded multi-process backend."""

from parm.backends.base import ROLES, Backend, InstanceSpec, ModelRef
from parm.backends.local import LocalBackend

__all__ = ["ROLES", "Backend", "InstanceSpec", "LocalBackend", "ModelRef"]
