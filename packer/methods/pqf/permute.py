"""Channel permutations that keep the network's function but make weights easier to PQ.

Groups come from the model's torch.fx graph: a *channel space* is a tensor's channel axis;
a Conv/Linear writes a new space (its rows are the group's parents) and reads one (its columns
are children), BatchNorm, element-wise ops and spatial slicing stay in their input's space,
and `a + b` merges the spaces of a and b, so a residual stream (all its writers and readers)
is one group. Permuting a space's channels everywhere at once leaves the function unchanged.
A space that reaches the network's input or output, an unknown op, a channel concatenation, or
channel zero-padding (an option-A shortcut maps channel c to c + pad of a wider space, tying
two spaces together) is not permuted, and the report says why. Everything is read from the
traced graph, so no model's own classes need to be known here.

Objective (the paper's): log det Cov of a child's sub-vectors after permuting its input
channels, summed over the group's optimisable children (the reference used only the first).
Greedy bucket initialisation, then seeded stochastic local search with exact incremental
updates of the covariance; a result that does not lower the objective is discarded.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

_WRITERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SAME_SPACE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool1d,
                       nn.MaxPool2d, nn.AvgPool2d, nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid,
                       nn.Tanh, nn.Hardtanh, nn.ELU)
_SAME_SPACE_FUNCS: set[Any] = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.dropout,
                               F.max_pool2d, F.avg_pool2d, torch.sigmoid, torch.tanh,
                               F.hardswish, F.silu, F.gelu, operator.neg}
_SAME_SPACE_METHODS = {"relu", "relu_", "contiguous", "sigmoid", "tanh", "clone", "detach"}
_MERGE = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
          operator.sub, operator.isub}
_MERGE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}


@dataclass
class Group:
    """One channel space: modules whose output rows / input columns share a permutation."""

    writers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # why it cannot be permuted

    @property
    def label(self) -> str:
        return ",".join(self.writers) or "?"


class _Spaces:
    """Union-find over channel spaces, with the facts gathered about each."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.facts: list[Group] = []

    def new(self, blocked: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.facts.append(Group())
        if blocked:
            self.facts[-1].blocked.append(blocked)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra

    def groups(self) -> list[Group]:
        merged: dict[int, Group] = {}
        for s, facts in enumerate(self.facts):
            g = merged.setdefault(self.find(s), Group())
            for attr in ("writers", "norms", "readers", "blocked"):
                for item in getattr(facts, attr):
                    if item not in getattr(g, attr):
                        getattr(g, attr).append(item)
        return [merged[r] for r in sorted(merged)]


def find_groups(model: nn.Module) -> list[Group]:
    """Every channel space of the model with its writers, norms, readers and blockers."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds on untraceable Python control flow
        raise ValueError(f"cannot trace the model with torch.fx: {exc}") from None
    modules = dict(model.named_modules())
    sp = _Spaces()
    space: dict[fx.Node, int] = {}
    pooled: set[fx.Node] = set()

    def tensor_args(node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in space]

    def block_all(node: fx.Node, why: str) -> None:
        for a in tensor_args(node):
            sp.facts[sp.find(space[a])].blocked.append(why)

    for node in graph.nodes:
        if node.op == "placeholder":
            space[node] = sp.new("network input")
        elif node.op == "output":
            block_all(node, "network output")
        elif node.op == "get_attr":
            space[node] = sp.new(f"tensor attribute {node.target}")
        elif node.op == "call_module":
            m = modules[node.target]
            args = tensor_args(node)
            src = space[args[0]] if args else sp.new("no input")
            if isinstance(m, _WRITERS) and getattr(m, "groups", 1) == 1 and len(args) == 1:
                sp.facts[src].readers.append(node.target)
                space[node] = sp.new()
                sp.facts[space[node]].writers.append(node.target)
            elif isinstance(m, _BN) and len(args) == 1:
                sp.facts[src].norms.append(node.target)
                space[node] = src
            elif isinstance(m, _SAME_SPACE_MODULES) and len(args) == 1:
                space[node] = src
            elif isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) and len(args) == 1:
                space[node] = src
                if m.output_size in (1, (1, 1)):
                    pooled.add(node)
            elif isinstance(m, nn.Flatten) and args and args[0] in pooled and m.start_dim == 1:
                space[node] = src
            else:
                block_all(node, f"{type(m).__name__} {node.target}")
                space[node] = sp.new(f"output of {type(m).__name__} {node.target}")
        else:  # call_function / call_method
            _function_node(node, sp, space, pooled, tensor_args, block_all)
    return sp.groups()


def _function_node(node: fx.Node, sp: _Spaces, space: dict[fx.Node, int], pooled: set[fx.Node],
                   tensor_args: Callable[[fx.Node], list[fx.Node]],
                   block_all: Callable[[fx.Node, str], None]) -> None:
    args = tensor_args(node)
    target = node.target
    is_method = node.op == "call_method"
    name = target if is_method else getattr(target, "__name__", str(target))
    if not args:
        return  # sizes, constants: no channel axis
    if target in ("size", "dim") or target is getattr:
        return
    src = space[args[0]]
    first_is_tensor = bool(node.args) and node.args[0] is args[0]
    if (target in _SAME_SPACE_FUNCS or (is_method and target in _SAME_SPACE_METHODS)) \
            and len(args) == 1:
        space[node] = src
    elif target in _MERGE or (is_method and target in _MERGE_METHODS):
        for other in args[1:]:
            src = sp.union(src, space[other])
        space[node] = src
    elif target is operator.getitem and first_is_tensor and _keeps_channels(node.args[1]):
        space[node] = src  # x[:, :, ::2, ::2]: spatial slicing keeps every channel in place
    elif target is F.pad and first_is_tensor and _pads_channels(node) is not None:
        why = (f"channel zero-padding in {_where(node)} (an option-A pad shortcut: channel c "
               f"-> c+{_pads_channels(node)})")
        block_all(node, why)
        space[node] = sp.new(why)
    elif target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d) and len(args) == 1:
        space[node] = src
        if node.args[1:2] in ((1,), ((1, 1),)):
            pooled.add(node)
    elif (target is torch.flatten or (is_method and target in ("flatten", "view", "reshape"))) \
            and first_is_tensor and args[0] in pooled and len(args) == 1 \
            and _flattens_from_1(node):
        space[node] = src
    else:
        block_all(node, f"operation {name}")
        space[node] = sp.new(f"output of {name}")


def _where(node: fx.Node) -> str:
    """The module a traced operation ran in (its qualified name), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), node.name) if stack else node.name


def _keeps_channels(index: Any) -> bool:
    """An index that takes every sample and every channel as they are (dims 0 and 1 whole)."""
    whole = slice(None)
    return isinstance(index, tuple) and len(index) >= 2 and index[0] == whole \
        and index[1] == whole and all(isinstance(i, slice) for i in index[2:])


def _pads_channels(node: fx.Node) -> int | None:
    """For F.pad of an N, C, H, W tensor that pads channels: the channels added in front."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pad, tuple | list) or len(pad) < 6 or not all(
            isinstance(p, int) for p in pad):
        return None
    return pad[4] if pad[4] or pad[5] else None


def _flattens_from_1(node: fx.Node) -> bool:
    if node.target in ("view", "reshape"):
        rest = node.args[1:]
        return len(rest) == 2 and rest[1] == -1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start == 1


# --- objective ------------------------------------------------------------------------------


class _ChildObjective:
    """Incremental log det Cov of one child's sub-vectors under input-channel permutations.

    The child weight is viewed as [C_out, C_in/b, b*kk] (b channels of kk values per
    sub-vector). Sub-vector column j of every row depends only on the channels at positions
    j*b .. j*b+b-1, so a swap changes at most two columns' sums, which are updated exactly.
    """

    def __init__(self, weight: np.ndarray, d: int) -> None:
        c_out, c_in = weight.shape[:2]
        self.kk = int(np.prod(weight.shape[2:])) if weight.ndim > 2 else 1
        self.b = d // self.kk
        self.d = d
        self.w = weight.reshape(c_out, c_in, self.kk).astype(np.float64)
        self.n = c_out * c_in // self.b
        self.cols = c_in // self.b

    def column_stats(self, perm: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        chans = perm[j * self.b:(j + 1) * self.b]
        x = self.w[:, chans, :].reshape(self.w.shape[0], self.d)
        return x.sum(0), x.T @ x

    def init(self, perm: np.ndarray) -> None:
        self.s1 = np.zeros((self.cols, self.d))
        self.s2 = np.zeros((self.cols, self.d, self.d))
        for j in range(self.cols):
            self.s1[j], self.s2[j] = self.column_stats(perm, j)
        self.t1, self.t2 = self.s1.sum(0), self.s2.sum(0)

    def logdet(self, t1: np.ndarray, t2: np.ndarray) -> float:
        mean = t1 / self.n
        cov = (t2 - self.n * np.outer(mean, mean)) / max(self.n - 1, 1)
        sign, value = np.linalg.slogdet(cov)
        return float(value) if sign > 0 else -math.inf

    def value(self) -> float:
        return self.logdet(self.t1, self.t2)


def _score_channel(weight: np.ndarray, c: int) -> float:
    """Greedy visiting order: column variance (1x1) or log det of a channel's kernels (kxk)."""
    col = weight[:, c].reshape(weight.shape[0], -1)
    if col.shape[1] == 1:
        return float(col.var())
    sign, value = np.linalg.slogdet(np.cov(col, rowvar=False))
    return float(value) if sign > 0 else -math.inf


def greedy_buckets(weight: np.ndarray, d: int) -> np.ndarray:
    """The reference's bucket initialisation: spread high-variance channels over sub-vector
    positions, then interleave the buckets so each sub-vector takes one channel per bucket."""
    c_in = weight.shape[1]
    kk = int(np.prod(weight.shape[2:])) if weight.ndim > 2 else 1
    n_buckets = d // kk
    cap = c_in // n_buckets
    order = sorted(range(c_in), key=lambda c: (-_score_channel(weight, c), c))
    buckets: list[list[int]] = [[] for _ in range(n_buckets)]
    var = [1.0] * n_buckets
    for c in order:
        open_b = [i for i in range(n_buckets) if len(buckets[i]) < cap]
        i = min(open_b, key=lambda b: (var[b], b))
        buckets[i].append(c)
        var[i] = float(weight[:, buckets[i]].var())
    return np.array([buckets[b][j] for j in range(cap) for b in range(n_buckets)])


@dataclass
class PermutationResult:
    group: str
    perm: list[int] | None  # None: discarded or not optimisable
    objective_before: float
    objective_after: float
    accepted: int = 0
    note: str = ""


def optimise(children: list[tuple[np.ndarray, int]], iterations: int, seed: int,
             label: str) -> PermutationResult:
    """Greedy + stochastic local search over the input channels shared by `children`."""
    objs = [_ChildObjective(w, d) for w, d in children]
    c_in = children[0][0].shape[1]
    ident = np.arange(c_in)
    for o in objs:
        o.init(ident)
    before = sum(o.value() for o in objs)
    perm = greedy_buckets(*children[0])
    for o in objs:
        o.init(perm)
    current = sum(o.value() for o in objs)
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, c_in, size=(iterations, 2))
    accepted = 0
    for a, b in pairs:
        if a == b:
            continue
        trial = perm.copy()
        trial[a], trial[b] = trial[b], trial[a]
        updates = []
        total = 0.0
        for o in objs:
            cols = sorted({int(a) // o.b, int(b) // o.b})
            t1, t2 = o.t1.copy(), o.t2.copy()
            new = []
            for j in cols:
                s1, s2 = o.column_stats(trial, j)
                t1 += s1 - o.s1[j]
                t2 += s2 - o.s2[j]
                new.append((j, s1, s2))
            updates.append((t1, t2, new))
            total += o.logdet(t1, t2)
        if total < current:
            perm, current, accepted = trial, total, accepted + 1
            for o, (t1, t2, new) in zip(objs, updates, strict=True):
                o.t1, o.t2 = t1, t2
                for j, s1, s2 in new:
                    o.s1[j], o.s2[j] = s1, s2
    if not current < before:
        return PermutationResult(label, None, before, before, accepted,
                                 "discarded: no lower objective than the identity")
    return PermutationResult(label, perm.tolist(), before, current, accepted)


def apply_permutation(model: nn.Module, group: Group, perm: torch.Tensor) -> None:
    """Permute the group's channels everywhere: writer rows, norm channels, reader columns."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in group.writers:
            m = modules[name]
            m.weight.copy_(m.weight[perm])
            if m.bias is not None:
                m.bias.copy_(m.bias[perm])
        for name in group.norms:
            m = modules[name]
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(t[perm])
        for name in group.readers:
            m = modules[name]
            m.weight.copy_(m.weight[:, perm])


def optimisable(module: nn.Module, d: int) -> bool:
    """Permuting inputs changes the sub-vectors only when one holds several whole channels."""
    kk = math.prod(module.kernel_size) if not isinstance(module, nn.Linear) else 1
    return d % kk == 0 and d // kk > 1 and module.weight.shape[1] % (d // kk) == 0


def permute_model(model: nn.Module, subvector: Mapping[str, int], iterations: int, seed: int,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Optimise and apply every permutable group; one report entry per group considered."""
    modules = dict(model.named_modules())
    report: list[dict[str, Any]] = []
    for i, group in enumerate(find_groups(model)):
        if not group.readers or not group.writers:
            continue
        entry: dict[str, Any] = {"writers": group.writers, "readers": group.readers,
                                 "norms": group.norms}
        children = [r for r in group.readers if r in subvector
                    and optimisable(modules[r], subvector[r])]
        if group.blocked:
            entry["skipped"] = "; ".join(dict.fromkeys(group.blocked))
        elif not children:
            entry["skipped"] = "no optimisable child (each sub-vector is one whole kernel)"
        else:
            ws = [(modules[c].weight.detach().cpu().double().numpy(), subvector[c])
                  for c in children]
            if progress:
                progress(group.label)
            res = optimise(ws, iterations, seed + i, group.label)
            entry.update(children=children, objective_before=round(res.objective_before, 4),
                         objective_after=round(res.objective_after, 4),
                         accepted_swaps=res.accepted)
            if res.perm is None:
                entry["skipped"] = res.note
            else:
                apply_permutation(model, group, torch.tensor(res.perm, dtype=torch.long))
                entry["applied"] = True
        report.append(entry)
    return report
