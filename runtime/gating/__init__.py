"""FBS channel gating executed by the runtime (feature "channel_gating", format 1.2).

    gate.py   the arithmetic: saliency, the top-k rule with its tie order, ChannelGate
    build.py  apply_gates: install a file's gates in a model (runtime.load, the packer)
    macs.py   MacCounter: multiply-accumulates executed per image, counted while it runs
    skip.py   inference_graph: BatchNorm folded, and a batch-1 path that computes only the
              kept output channels from the non-zero input channels (SkipConv), and has
              every other conv read only its non-zero input channels (LiveInputConv)
"""

from runtime.gating.build import apply_gates, gate_points, gated_convs, gates_of
from runtime.gating.gate import GATE_CHILD, ChannelGate, keep_count, keep_top_k, saliency
from runtime.gating.macs import MacCounter, count_macs
from runtime.gating.skip import LiveInputConv, SkipConv, inference_graph

__all__ = ["GATE_CHILD", "ChannelGate", "LiveInputConv", "MacCounter", "SkipConv",
           "apply_gates", "count_macs", "gate_points", "gated_convs", "gates_of",
           "inference_graph", "keep_count", "keep_top_k", "saliency"]
