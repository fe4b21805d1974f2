"""Fused GPU kernels for the Engram branch, each beside a plain-PyTorch reference of the same signature."""
from kernels.engram_gate import engram_gate_reference as engram_gate
from kernels.row_gather import gather_rows_reference as gather_rows
from kernels.short_conv import short_conv_reference as short_conv

__all__ = ["gather_rows", "engram_gate", "short_conv"]
