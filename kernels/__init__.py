"""The Engram branch's three ops, each a checked dispatcher over a Triton kernel and a PyTorch reference.

``gather_rows`` (with its backward on its own, ``scatter_row_grads``), ``engram_gate`` and ``short_conv``
check their inputs, then run the Triton kernels on CUDA tensors and the references elsewhere (float64
always takes the reference); ``ENGRAM_KERNELS=triton|reference|auto`` forces a path (``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1``). Each op module (``row_gather``, ``engram_gate``, ``short_conv``)
holds its reference and dispatcher; its Triton kernels and autograd Function are in ``<op>_triton``,
imported only when a Triton path runs, so importing ``kernels`` never imports Triton.

The Triton gather's backward sums the rows' gradient in float32 (``scatter_row_grads`` is that sum on
its own, float32 ``[U, d]``); ``row_segments(inverse, len(rows))``, built ahead (row addresses are
known before the forward pass) and passed as ``segments``, makes it sort-free and the same bits on
every run.
"""
from kernels.dispatch import use_triton
from kernels.engram_gate import engram_gate, engram_gate_reference
from kernels.row_gather import (
    RowSegments,
    gather_rows,
    gather_rows_reference,
    row_segments,
    scatter_row_grads,
    scatter_row_grads_reference,
)
from kernels.short_conv import short_conv, short_conv_reference

__all__ = [
    "gather_rows", "engram_gate", "short_conv", "scatter_row_grads", "RowSegments", "row_segments",
    "gather_rows_reference", "engram_gate_reference", "short_conv_reference", "scatter_row_grads_reference",
    "use_triton",
]
