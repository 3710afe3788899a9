"""In-memory compressed tensors: what compression methods produce and the runtime decodes.

Methods return these objects and know nothing of files or coders; the packer turns them
into coded streams, and the runtime turns streams back into them. `dequantize()` computes each
scheme's arithmetic as docs/FORMAT.md specifies it, shared by both sides so they agree bit for
bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _shape(t: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(d) for d in t)


@dataclass(frozen=True)
class RawTensor:
    """Values kept as they are, optionally at a lower float precision (`values.dtype`)."""

    values: torch.Tensor
    dtype: torch.dtype  # dtype restored on decode

    @property
    def shape(self) -> tuple[int, ...]:
        return _shape(self.values.shape)

    def dequantize(self) -> torch.Tensor:
        return self.values.to(self.dtype)


@dataclass(frozen=True)
class UniformTensor:
    """value = (code - zero_point[c]) * scale[c], with c running along `axis`.

    Symmetric grids (zero_points None) use codes in [-(2^(b-1)-1), 2^(b-1)-1] (TensorRT's
    int8 rule at b=8); asymmetric ones use [0, 2^b - 1].
    """

    codes: torch.Tensor  # integer, same shape as the weight
    scales: torch.Tensor  # float32, one per channel along axis (or one)
    zero_points: torch.Tensor | None
    bits: int
    axis: int | None
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, ...]:
        return _shape(self.codes.shape)

    @property
    def code_range(self) -> tuple[int, int]:
        if self.zero_points is None:
            half = (1 << (self.bits - 1)) - 1
            return -half, half
        return 0, (1 << self.bits) - 1

    def _broadcast(self, per_channel: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return per_channel.reshape(())
        view = [1] * self.codes.dim()
        view[self.axis] = -1
        return per_channel.reshape(view)

    def dequantize(self) -> torch.Tensor:
        codes = self.codes.to(torch.int32)
        if self.zero_points is not None:
            codes = codes - self._broadcast(self.zero_points.to(torch.int32))
        return (codes.to(torch.float32) * self._broadcast(self.scales.float())).to(self.dtype)


@dataclass(frozen=True)
class ScalarCodebookTensor:
    """value = codebook[index]: weight sharing; a codebook entry of exactly 0 prunes."""

    codebook: torch.Tensor  # [K], float32 or float16
    indices: torch.Tensor  # integer, same shape as the weight
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, ...]:
        return _shape(self.indices.shape)

    def dequantize(self) -> torch.Tensor:
        # index_select, not advanced indexing: ~80x faster on CPU for this gather.
        flat = torch.index_select(self.codebook.float(), 0, self.indices.reshape(-1))
        return flat.reshape(self.indices.shape).to(self.dtype)


@dataclass(frozen=True)
class VectorCodebookTensor:
    """Product quantization: the row-major weight is cut into contiguous runs of d values,
    each replaced by codeword codebook[index] (layout 0, the only one in format v1)."""

    codebook: torch.Tensor  # [K, d]
    indices: torch.Tensor  # [numel / d], integer
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def subvector_size(self) -> int:
        return int(self.codebook.shape[1])

    def dequantize(self) -> torch.Tensor:
        flat = torch.index_select(self.codebook.float(), 0, self.indices.reshape(-1))
        return flat.reshape(self.shape).to(self.dtype)


CompressedTensor = RawTensor | UniformTensor | ScalarCodebookTensor | VectorCodebookTensor
