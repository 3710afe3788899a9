"""What the post-training steps need to know about a model's graph: which BatchNorm reads
each layer's output (its scale weights the reconstruction error, and a bias shift can be
folded into its running mean)."""

from __future__ import annotations

import logging

from torch import fx, nn

log = logging.getLogger(__name__)

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def following_norms(model: nn.Module) -> dict[str, str]:
    """Layer name -> name of the BatchNorm that is the only reader of its output.

    Found on the torch.fx graph; a model fx cannot trace gets an empty map (every layer is
    then treated as having no BatchNorm after it: correct, only less precise).
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable code
        log.info("no graph for BatchNorm pairing (%s); layers treated as unnormalised",
                 str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
        return {}
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if (user.op == "call_module" and isinstance(modules.get(str(user.target)), NORMS)
                and user.args and user.args[0] is node):
            out[str(node.target)] = str(user.target)
    return out
