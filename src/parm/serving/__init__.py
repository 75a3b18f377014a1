"""The serving frontend: batching, coding groups, encode/dispatch/decode, modes, metrics."""

from parm.serving.config import CODED_MODES, MODES, ServingConfig, instance_roles, parity_role
from parm.serving.frontend import Frontend
from parm.serving.metrics import ServingMetrics
from parm.serving.tracker import Answer, Cancel, GroupTracker, Resend
from parm.serving.types import Prediction, PredictService, Source

__all__ = [
    "CODED_MODES",
    "MODES",
    "Answer",
    "Cancel",
    "Frontend",
    "GroupTracker",
    "PredictService",
    "Prediction",
    "Resend",
    "ServingConfig",
    "ServingMetrics",
    "Source",
    "instance_roles",
    "parity_role",
]
