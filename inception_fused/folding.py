"""BatchNorm folding: conv → BN(running stats) becomes one conv with a bias.

Weights are packed in the layout the kernels read, an implicit-GEMM matrix
[KS*KS*C_in, C_out] (row = tap * C_in + input channel, output channels contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .kernels.launch import aligned_rows, compiled_for_gpu, outside_graph_pools
from .reference import ConvBlock, InceptionModule


@dataclass(frozen=True)
class FoldedInception:
    """Eval-mode weights of one Inception module, BN folded, packed for the kernels."""

    stem_w: torch.Tensor  # [C_in, c1 + r3 + r5]: the three 1x1 convs that read x
    stem_b: torch.Tensor
    pool_w: torch.Tensor  # [C_in, pool_proj]
    pool_b: torch.Tensor
    w3: torch.Tensor  # [k3*k3*r3, c3]
    b3: torch.Tensor
    w5: torch.Tensor  # [k5*k5*r5, c5]
    b5: torch.Tensor
    c1: int
    r3: int
    k3: int
    k5: int

    # args: the fields in order, the argument list of the eval op and the C++ entry.
    # widths: (stem columns, c1, r3, c3, c5, pool), what a launch plan needs of the fold.
    # Computed once here rather than by functools.cached_property, whose lock Dynamo
    # cannot trace (a graph break per block under torch.compile).
    args: tuple[torch.Tensor | int, ...] = field(init=False, repr=False, compare=False)
    widths: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        args = tuple(getattr(self, n) for n in _FOLDED_FIELDS)
        object.__setattr__(self, "args", args)
        widths = (
            self.stem_w.shape[1],
            self.c1,
            self.r3,
            self.w3.shape[1],
            self.w5.shape[1],
            self.pool_w.shape[1],
        )
        object.__setattr__(self, "widths", widths)


# The fields that make up FoldedInception.args (dataclasses.fields is slow per call).
_FOLDED_FIELDS = tuple(f.name for f in fields(FoldedInception) if f.init)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Biases and BN statistics are kept in fp64 for fp64 inputs, else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Conv weight [C_out, C_in, k, k] -> implicit-GEMM matrix [k*k*C_in, C_out]."""
    packed = weight.permute(2, 3, 1, 0)
    if packed.dtype == dtype:
        packed = packed.contiguous()
    else:  # one copy that casts and reorders at once
        packed = packed.to(dtype, memory_format=torch.contiguous_format)
    return packed.view(-1, weight.shape[0])


def pack_stem(weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The 1x1 conv weights [C_out_i, C_in, 1, 1] side by side: [C_in, sum C_out_i],
    packed by one cat."""
    stem = torch.cat([w.permute(2, 3, 1, 0) for w in weights], 3)
    stem = stem.view(stem.shape[2], stem.shape[3])
    return stem if stem.dtype == dtype else stem.to(dtype)


_TRACING_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())
_CONSTANTS_KEPT = 256
_constants: dict[tuple, torch.Tensor] = {}


def constant_vector(
    values: tuple[float, ...],
    sizes: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``sizes[i]`` copies of ``values[i]``, one after another (zero biases, unit gammas,
    BN eps): built once per arguments and shared, so never write to it. Neither cached
    nor taken from the cache while tracing (fake, proxy or functional tensors), nor
    cached when built during a CUDA graph capture (its memory belongs to the graph); a
    cached one is allocated outside any graph pool (cudagraph trees' warmup would lend
    it memory that PyTorch hands out again).
    """
    tracing = torch._C._len_torch_dispatch_stack() and any(
        torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES
    )
    key = (values, sizes, dtype, device)
    vector = None if tracing else _constants.get(key)
    if vector is not None:
        return vector

    def build() -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return torch.cat(
                [
                    torch.full((n,), v, dtype=dtype, device=device)
                    for v, n in zip(values, sizes, strict=True)
                ]
            )

    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if tracing or capturing or len(_constants) >= _CONSTANTS_KEPT:
        return build()
    vector = _constants[key] = outside_graph_pools(device, build)
    return vector


def fold_conv_block(
    block: ConvBlock, dtype: torch.dtype, fold_bn: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [KS*KS*C_in, C_out] in ``dtype``, bias [C_out] in the accumulator dtype).

    With ``fold_bn=False`` the raw conv weight is packed and the bias is the conv's own
    (zeros when a BN follows): what the train-mode kernels multiply by.
    """
    acc = accumulator_dtype(dtype)
    w = block.conv.weight.detach().to(acc)
    if block.bn is not None and not fold_bn:
        bias = torch.zeros(w.shape[0], dtype=acc, device=w.device)
    elif block.bn is None:
        bias = block.conv.bias.detach().to(acc)
    else:
        bn = block.bn
        scale = torch.rsqrt(bn.running_var.detach().to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(acc)
        bias = -bn.running_mean.detach().to(acc) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.detach().to(acc)
        w = w * scale[:, None, None, None]
    return pack_weight(w, dtype), bias.contiguous()


def conv_blocks(module: InceptionModule) -> tuple[ConvBlock, ...]:
    """The six conv blocks in BLOCK_ORDER."""
    return (
        module.branch1,
        module.branch2[0],
        module.branch3[0],
        module.branch2[1],
        module.branch3[1],
        module.branch4[1],
    )


BLOCK_ORDER = ("branch1", "red3", "red5", "conv3", "conv5", "pool")
# BLOCK_ORDER indices of the output layers [c1 | c3 | c5 | cp], then of the reduce
# layers [r3 | r5]: the kernels' channel order.
OUT_THEN_RED = (0, 3, 4, 5, 1, 2)


def fold_inception(
    module: InceptionModule, dtype: torch.dtype, fold_bn: bool = True
) -> FoldedInception:
    """Pack the module's weights for the kernels; BN folded in unless ``fold_bn=False``."""
    b1, red3, red5, conv3, conv5, pool = (
        fold_conv_block(b, dtype, fold_bn) for b in conv_blocks(module)
    )
    parts = (b1, red3, red5)
    pool_w, pool_b = pool
    w3, b3 = conv3
    w5, b5 = conv5
    stem_w = torch.cat([w for w, _ in parts], 1)
    if compiled_for_gpu(stem_w):  # the C++ backend reads a contiguous one
        stem_w = aligned_rows(*stem_w.shape, dtype, stem_w.device).copy_(stem_w)
    return FoldedInception(
        stem_w=stem_w,
        stem_b=torch.cat([b for _, b in parts]),
        pool_w=pool_w,
        pool_b=pool_b,
        w3=w3,
        b3=b3,
        w5=w5,
        b5=b5,
        c1=module.branch1.conv.out_channels,
        r3=module.branch2[0].conv.out_channels,
        k3=module.branch2[1].conv.kernel_size[0],
        k5=module.branch3[1].conv.kernel_size[0],
    )


def pack_raw_inception(module: InceptionModule, dtype: torch.dtype) -> FoldedInception:
    """Raw (unfolded) conv weights and conv biases, packed like the eval weights."""
    return fold_inception(module, dtype, fold_bn=False)


@dataclass
class BNParams:
    """The six BatchNorms of one module as per-channel vectors for the train kernels.

    Vectors are in the accumulator dtype and split like the kernels' outputs: ``*_out`` in
    output-channel order [c1 | c3 | c5 | cp], ``*_red`` in reduce order [r3 | r5]. Running
    statistics stay per layer (lists in BLOCK_ORDER; None where a layer does not track them).
    The eps vectors are shared constants (:func:`constant_vector`): read-only.
    """

    gamma_out: torch.Tensor
    beta_out: torch.Tensor
    eps_out: torch.Tensor
    gamma_red: torch.Tensor
    beta_red: torch.Tensor
    eps_red: torch.Tensor
    running_mean: list[torch.Tensor | None]
    running_var: list[torch.Tensor | None]
    num_batches_tracked: list[torch.Tensor | None]
    momentum: list[float | None]

    @classmethod
    def build(
        cls,
        gammas: list[torch.Tensor | None],
        betas: list[torch.Tensor | None],
        eps: list[float],
        running_mean: list[torch.Tensor | None],
        running_var: list[torch.Tensor | None],
        num_batches_tracked: list[torch.Tensor | None],
        momentum: list[float | None],
        channels: list[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> BNParams:
        """Lists in BLOCK_ORDER; a None gamma/beta (affine=False) means 1/0."""
        acc = accumulator_dtype(dtype)
        sizes = tuple(channels[i] for i in OUT_THEN_RED)
        c_out, c_red = sum(sizes[:4]), sum(sizes[4:])
        split = [c_out, c_red, c_out, c_red]
        # gamma_out | gamma_red | beta_out | beta_red in one cat.
        parts = [
            constant_vector((fill,), (channels[i],), acc, device)
            if values[i] is None
            else values[i]
            for values, fill in ((gammas, 1.0), (betas, 0.0))
            for i in OUT_THEN_RED
        ]
        vectors = torch.cat(parts)
        if vectors.dtype != acc:
            vectors = vectors.to(acc)
        gamma_out, gamma_red, beta_out, beta_red = vectors.split_with_sizes(split)
        eps_all = constant_vector(
            tuple(eps[i] for i in OUT_THEN_RED), sizes, acc, device
        )
        eps_out, eps_red = eps_all.split_with_sizes(split[:2])
        return cls(
            gamma_out=gamma_out,
            beta_out=beta_out,
            eps_out=eps_out,
            gamma_red=gamma_red,
            beta_red=beta_red,
            eps_red=eps_red,
            running_mean=list(running_mean),
            running_var=list(running_var),
            num_batches_tracked=list(num_batches_tracked),
            momentum=list(momentum),
        )

    @classmethod
    def from_module(
        cls, module: InceptionModule, dtype: torch.dtype
    ) -> BNParams | None:
        """None when the module has no BatchNorm (batch_norm=False)."""
        blocks = conv_blocks(module)
        if blocks[0].bn is None:
            return None
        bns = [b.bn for b in blocks]
        with torch.no_grad():
            return cls.build(
                gammas=[bn.weight for bn in bns],
                betas=[bn.bias for bn in bns],
                eps=[bn.eps for bn in bns],
                running_mean=[bn.running_mean for bn in bns],
                running_var=[bn.running_var for bn in bns],
                num_batches_tracked=[bn.num_batches_tracked for bn in bns],
                momentum=[bn.momentum for bn in bns],
                channels=[bn.num_features for bn in bns],
                device=blocks[0].conv.weight.device,
                dtype=dtype,
            )
