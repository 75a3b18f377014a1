"""Pure tensor math of parity coding: code configs, encoders and decoders. No I/O."""

from parm.coding.config import CONCAT_KS, ENCODERS, CodeConfig
from parm.coding.decoders import decode, reconstruct_each, subtract
from parm.coding.encoders import encode, encode_add, encode_concat
from parm.coding.envelope import InputEnvelope

__all__ = [
    "CONCAT_KS",
    "ENCODERS",
    "CodeConfig",
    "InputEnvelope",
    "decode",
    "encode",
    "encode_add",
    "encode_concat",
    "reconstruct_each",
    "subtract",
]
