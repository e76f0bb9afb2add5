"""The ``node.meta`` keys convfx's analysis passes write, named once.

Analysis passes record what they learn on the graph's nodes (as ``torch.fx``'s own
``ShapeProp`` does) and never mutate the graph; later passes read these keys.
"""
from __future__ import annotations

__all__ = ["IN_SHAPE", "OUT_SHAPE", "MACS"]

#: Shape of a node's first input, from :func:`passes.flops.propagate_shapes`.
IN_SHAPE = "convfx_in_shape"
#: Shape of a node's output tensor, from :func:`passes.flops.propagate_shapes`.
OUT_SHAPE = "convfx_out_shape"
#: fvcore-convention MACs of a conv/linear call, from :func:`passes.flops.annotate_macs`.
MACS = "convfx_macs"
