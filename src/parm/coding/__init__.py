"""Pure tensor math of parity coding: code configs, encoders and decoders. No I/O."""

from parm.coding.berrut import berrut_decode, berrut_encode, berrut_nodes, berrut_reconstruct_each
from parm.coding.config import ENCODERS, CodeConfig
from parm.coding.decoders import decode, member_prediction, reconstruct_each, subtract
from parm.coding.encoders import concat_grid, encode, encode_add, encode_concat
from parm.coding.envelope import InputEnvelope

__all__ = [
    "ENCODERS",
    "CodeConfig",
    "InputEnvelope",
    "berrut_decode",
    "berrut_encode",
    "berrut_nodes",
    "berrut_reconstruct_each",
    "concat_grid",
    "decode",
    "encode",
    "encode_add",
    "encode_concat",
    "member_prediction",
    "reconstruct_each",
    "subtract",
]
