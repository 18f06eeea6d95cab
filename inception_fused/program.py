"""An Inception network's eval forward as a program of fused steps, for either backend.

A program is a list of ops over named channels_last maps:

- :class:`ConvOp`: branches of conv + folded BN + ReLU that run together (one parallel
  region on CPU), each storing into its channel slice of a map: a block's output, or the
  map the next depth of a branch reads. The 1x1 convs that read the same map are one
  packed weight (one GEMM over the rows of x); a pool branch takes its 3x3/s1/p1 pool
  (max, or average with or without the padding counted) while its 1x1 loads.
- :class:`MaxPoolOp`: a max pool into a channel slice (the stem's and the stride-2
  blocks' pass-through branch).
- :class:`HeadOp`: the average pool, then the FC when there is one.

:class:`ProgramBuilder` makes one from a run of layers in forward order (BasicConv2d,
MaxPool2d, Inception blocks described by a :class:`BlockGraph`, the average pool, the FC).
The C++ backend runs it as one call (``Program`` in csrc/program.h, fed by
:meth:`Program.encode`); :class:`TritonProgram` runs the same ops as Triton launches.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from .cpu import load_extension, winograd_transform
from .folding import accumulator_dtype, fold_conv_block, pack_weight
from .kernels.conv import launch_conv_relu, pooled_size
from .kernels.head import launch_avg_pool_fc
from .kernels.launch import empty_channels_last, pair
from .kernels.max_pool import launch_max_pool


class Pool(enum.IntEnum):
    """A pool branch's 3x3/s1/p1 pool, taken while its 1x1 conv loads the input."""

    NONE = 0
    MAX = 1
    AVG = 2  # count_include_pad=True (torchvision)
    AVG_EXCLUDE_PAD = 3  # count_include_pad=False (TensorFlow's, the FID networks')


@dataclass(frozen=True)
class BlockGraph:
    """An Inception block as chains of its BasicConv2d submodules.

    Each chain is "source>conv>conv...": the source is "x" (the block input), "pool"
    (the block's pool branch: the pool of x), or a conv of an earlier chain (Inception-E's
    split). The block's output is the concatenation of every chain's last conv, in chain
    order, then ``pass_through`` (a max pool of x, kernel 3 stride 2, for the stride-2
    blocks).
    """

    chains: tuple[str, ...]
    pass_through: bool = False

    def edges(self) -> list[tuple[str, str]]:
        """(source, conv) for every conv, sources first."""
        out = []
        for chain in self.chains:
            names = chain.split(">")
            out += list(itertools.pairwise(names))
        return out

    def outputs(self) -> list[str]:
        return [chain.split(">")[-1] for chain in self.chains]


@dataclass
class Map:
    channels: int
    border: int = 0  # the widest padding of a conv that reads it
    slot: int = -1  # buffer shared with maps of disjoint lives; -1: the result


@dataclass
class Branch:
    src: int
    dst: int
    dst_channel: int
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    pool: Pool = Pool.NONE

    @property
    def geometry(self) -> tuple[int, ...]:
        """kh, kw, stride, pad_h, pad_w (basic_conv_ok: one stride both ways)."""
        (kh, kw), (ph, pw) = self.conv.kernel_size, self.conv.padding
        return kh, kw, self.conv.stride[0], ph, pw


@dataclass
class ConvOp:
    branches: list[Branch]


@dataclass
class MaxPoolOp:
    src: int
    dst: int
    dst_channel: int
    kernel: int
    stride: int
    ceil_mode: bool


@dataclass
class HeadOp:
    src: int
    fc: nn.Linear | None = None


def basic_conv_ok(m: nn.Module) -> bool:
    """A BasicConv2d (conv without bias, eval BatchNorm, ReLU) the kernels run."""
    conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
    return (
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.stride[0] == conv.stride[1]
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def max_pool_ok(m: nn.Module) -> bool:
    return (
        type(m) is nn.MaxPool2d
        and pair(m.kernel_size)[0] == pair(m.kernel_size)[1]
        and pair(m.stride)[0] == pair(m.stride)[1]
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
        and not m.return_indices
    )


@dataclass
class Program:
    """Ops over maps; map 0 is the input (its affine: x * scale + shift per channel)."""

    maps: list[Map]
    ops: list[ConvOp | MaxPoolOp | HeadOp] = field(default_factory=list)
    affine: torch.Tensor | None = None  # [2, C_in]
    result: int | None = None  # the map returned; None: the head's output

    def encode(
        self, dtype: torch.dtype, winograd: bool = True
    ) -> tuple[list[torch.Tensor], list[int]]:
        """The tensors and ints of csrc/program.h: BN folded into every conv, the 1x1s
        that read one map and run in one op packed side by side, 3x3 stride-1 convs
        Winograd-transformed (unless a weight is not finite, or ``winograd`` is off)."""
        ext = load_extension()
        tensors: list[torch.Tensor] = []

        def add(t: torch.Tensor) -> int:
            tensors.append(t.to(dtype).contiguous())
            return len(tensors) - 1

        ints = [len(self.maps)]
        for m in self.maps:
            ints += [m.channels, m.border, m.slot]
        ints += [0, 0, add(self.affine) if self.affine is not None else -1]
        with torch.no_grad():
            for op in self.ops:
                if isinstance(op, MaxPoolOp):
                    ints += [2, op.src, op.dst, op.dst_channel, op.kernel, op.stride,
                             int(op.ceil_mode)]  # fmt: skip
                elif isinstance(op, HeadOp):
                    fc = op.fc
                    w = -1 if fc is None else add(pack_weight(fc.weight[:, :, None, None], dtype))
                    b = -1 if fc is None else add(fc.bias)
                    ints += [3, op.src, w, b]
                else:
                    ints += [1, len(op.branches)]
                    packed = _pack(op, dtype, add, ext if winograd else None)
                    for br, tensor_fields in zip(op.branches, packed, strict=True):
                        ints += [br.src, br.dst, br.dst_channel, *br.geometry,
                                 int(br.pool), *tensor_fields]  # fmt: skip
        return tensors, ints


def _pack(op: ConvOp, dtype: torch.dtype, add, ext) -> list[tuple[int, ...]]:
    """Folds and packs an op's weights; per branch (weight, bias, first column, end
    column, Winograd weights or -1) as tensor indices. 1x1 convs without a pool that
    read the same map share one [C_in, sum of cols] matrix."""
    packed: dict[int, tuple[int, ...]] = {}
    groups: dict[int, list[int]] = {}
    for i, br in enumerate(op.branches):
        if br.geometry == (1, 1, 1, 0, 0) and br.pool == Pool.NONE:
            groups.setdefault(br.src, []).append(i)
            continue
        w, b = fold_conv_block(br, dtype)
        u = None
        if ext is not None and br.geometry[:3] == (3, 3, 1):
            u = winograd_transform(ext, w, 3)
        packed[i] = (add(w), add(b), 0, w.shape[1], -1 if u is None else add(u))
    for group in groups.values():
        folded = [fold_conv_block(op.branches[i], dtype) for i in group]
        weight = add(torch.cat([w for w, _ in folded], 1))
        bias = add(torch.cat([b for _, b in folded]))
        col = 0
        for i, (w, _) in zip(group, folded, strict=True):
            packed[i] = (weight, bias, col, col + w.shape[1], -1)
            col += w.shape[1]
    return [packed[i] for i in range(len(op.branches))]


class ProgramBuilder:
    """Appends layers to a program; :meth:`finish` assigns buffer slots."""

    def __init__(self, in_channels: int, affine: torch.Tensor | None = None) -> None:
        self.program = Program([Map(in_channels)], affine=affine)
        self.current = 0  # the map the next layer reads

    def _map(self, channels: int) -> int:
        self.program.maps.append(Map(channels))
        return len(self.program.maps) - 1

    def _read(self, src: int, branch: Branch) -> Branch:
        m = self.program.maps[src]
        m.border = max(m.border, *branch.conv.padding)
        return branch

    def conv(self, m: nn.Module) -> None:
        dst = self._map(m.conv.out_channels)
        self.program.ops.append(ConvOp([self._read(self.current, Branch(self.current, dst, 0, m.conv, m.bn))]))
        self.current = dst

    def max_pool(self, m: nn.MaxPool2d) -> None:
        dst = self._map(self.program.maps[self.current].channels)
        kernel, stride = pair(m.kernel_size)[0], pair(m.stride)[0]
        self.program.ops.append(MaxPoolOp(self.current, dst, 0, kernel, stride, m.ceil_mode))
        self.current = dst

    def block(self, m: nn.Module, graph: BlockGraph, pool: Pool) -> None:
        """The block's convs grouped by depth: every branch that reads x (the 1x1s, the
        pool branch, a stride-2 3x3) in one op, then each next depth in one op."""
        x = self.current
        c_in = self.program.maps[x].channels
        edges = graph.edges()
        convs = {name: m.get_submodule(name) for _, name in edges}
        widths = [convs[name].conv.out_channels for name in graph.outputs()]
        c_out = sum(widths) + (c_in if graph.pass_through else 0)
        out = self._map(c_out)
        offsets = dict(zip(graph.outputs(), itertools.accumulate([0, *widths]), strict=False))
        depth: dict[str, int] = {"x": -1, "pool": -1}
        where: dict[str, int] = {"x": x, "pool": x}
        steps: list[list[Branch]] = []
        for src, name in edges:
            depth[name] = depth[src] + 1
            c = convs[name]
            if name in offsets:
                dst, channel = out, offsets[name]
            else:
                dst, channel = self._map(c.conv.out_channels), 0
            where[name] = dst
            br = Branch(where[src], dst, channel, c.conv, c.bn, pool if src == "pool" else Pool.NONE)
            if len(steps) <= depth[name]:
                steps.append([])
            steps[depth[name]].append(self._read(where[src], br))
        if graph.pass_through:
            self.program.ops.append(MaxPoolOp(x, out, sum(widths), 3, 2, False))
        self.program.ops += [ConvOp(step) for step in steps]
        self.current = out

    def head(self, fc: nn.Linear | None) -> None:
        self.program.ops.append(HeadOp(self.current, fc))

    def finish(self) -> Program:
        """Slots by liveness: a map's buffer is free for a later map once the last op
        that reads it is past (a map read and a map written by one op never share)."""
        prog = self.program
        first, last = {0: 0}, {0: 0}
        for i, op in enumerate(prog.ops, start=1):
            if isinstance(op, ConvOp):
                reads = [b.src for b in op.branches]
                writes = [b.dst for b in op.branches]
            else:
                reads, writes = [op.src], [] if isinstance(op, HeadOp) else [op.dst]
            for m in reads:
                last[m] = i
            for m in writes:
                first.setdefault(m, i)
                last[m] = max(last.get(m, i), i)
        result = prog.result = None if isinstance(prog.ops[-1], HeadOp) else self.current
        free_at: list[int] = []  # per slot: the op after which it is free
        for m in sorted(first, key=first.get):
            if m == result:
                prog.maps[m].slot = -1
                continue
            slot = next((s for s, t in enumerate(free_at) if t < first[m]), len(free_at))
            if slot == len(free_at):
                free_at.append(0)
            free_at[slot] = last[m]
            prog.maps[m].slot = slot
        return prog


def transform_rows(affine: torch.Tensor) -> torch.Tensor:
    """An input affine [2, C] (scale, shift) as conv_tile's transform rows [4, C]: 0, 1,
    scale, shift."""
    zeros_ones = torch.tensor([[0.0], [1.0]], dtype=affine.dtype)
    return torch.cat([zeros_ones.expand(2, affine.shape[1]), affine])


# The Triton conv launcher's names for the pools a 1x1 conv takes while loading.
TRITON_POOLS = {Pool.NONE: None, Pool.MAX: "max", Pool.AVG: "avg",
                Pool.AVG_EXCLUDE_PAD: "avg_exclude"}  # fmt: skip


@dataclass
class TritonProgram:
    """A program's ops as Triton launches (CUDA, or the interpreter on CPU): one per conv
    branch into its channel slice, one per max pool, the head as one (features alone:
    times an identity). Weights folded once for one dtype and device."""

    program: Program
    weights: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per conv op, per branch
    transform: torch.Tensor | None  # [4, C_in]: 0, 1, scale, shift (conv_tile's rows)
    head: tuple[torch.Tensor, torch.Tensor] | None  # FC weight [classes, C], bias

    @staticmethod
    def runs(program: Program) -> bool:
        """Whether the launchers run every op (the max pool kernel is stride 2 only)."""
        return all(op.stride == 2 for op in program.ops if isinstance(op, MaxPoolOp))

    @classmethod
    def build(cls, program: Program, dtype: torch.dtype, device: torch.device) -> TritonProgram:
        acc = accumulator_dtype(dtype)
        weights, head = [], None
        with torch.no_grad():
            for op in program.ops:
                if isinstance(op, ConvOp):
                    weights.append([tuple(t.to(device) for t in fold_conv_block(br, dtype)) for br in op.branches])
                elif isinstance(op, HeadOp):
                    c = program.maps[op.src].channels
                    fc = op.fc
                    w = torch.eye(c) if fc is None else fc.weight.detach()
                    b = torch.zeros(c) if fc is None else fc.bias.detach()
                    head = (w.to(device, dtype), b.to(device, acc).contiguous())
            transform = None
            if program.affine is not None:
                transform = transform_rows(program.affine).to(device, acc)
        return cls(program, weights, transform, head)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        maps: dict[int, torch.Tensor] = {0: x}
        conv_ops = iter(self.weights)
        n = x.shape[0]
        for op in self.program.ops:
            if isinstance(op, HeadOp):
                return launch_avg_pool_fc(maps[op.src], *self.head)
            if isinstance(op, MaxPoolOp):
                src = maps[op.src]
                shape = (n, self.program.maps[op.dst].channels,
                         *(pooled_size(s, op.kernel, 2, op.ceil_mode) for s in src.shape[2:]))  # fmt: skip
                if op.dst not in maps:
                    maps[op.dst] = empty_channels_last(shape, src)
                dst = maps[op.dst]
                launch_max_pool(src, op.kernel, op.ceil_mode, out=dst, out_channel=op.dst_channel)
                continue
            for br, (w, b) in zip(op.branches, next(conv_ops), strict=True):
                src = maps[br.src]
                kh, kw, stride, ph, pw = br.geometry
                h, wd = (
                    (s + 2 * p - k) // stride + 1
                    for s, p, k in zip(src.shape[2:], (ph, pw), (kh, kw), strict=True)
                )
                if h < 1 or wd < 1:
                    raise ValueError(f"input {list(x.shape)} is too small for {br.conv}")
                if br.dst not in maps:  # a block output: its first branch allocates it
                    maps[br.dst] = empty_channels_last((n, self.program.maps[br.dst].channels, h, wd), src)
                dst = maps[br.dst]
                launch_conv_relu(
                    src, w, b, (kh, kw), stride, pool=TRITON_POOLS[br.pool],
                    transform=self.transform if br.src == 0 else None, padding=(ph, pw),
                    out=dst, out_channel=br.dst_channel,
                )  # fmt: skip
        return maps[self.program.result]
