"""The content of the committed golden file: small, deterministic, every scheme and coder."""

from __future__ import annotations

import hashlib

import torch

from runtime.tensors import (
    CompressedTensor,
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)

# Each tensor's streams use the coder named here, so the file pins every coder's bitstream.
GOLDEN_CODERS = {
    "raw_fp32": "zstd", "raw_fp16": "raw", "raw_bf16": "huffman", "count": "raw",
    "uniform": "ans", "uniform_layer": "huffman", "kmeans": "ans", "kmeans_zstd": "zstd",
    "pq": "huffman", "pq_raw": "raw",
}


def golden_tensors() -> dict[str, CompressedTensor]:
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(8, 4, 3, 3, generator=g)
    codes = torch.clamp(torch.round(torch.randn(8, 4, 3, 3, generator=g) * 3), -15, 15)
    indices = torch.clamp((torch.randn(8, 4, 3, 3, generator=g) * 5 + 16).long(), 0, 31)
    return {
        "raw_fp32": RawTensor(w, torch.float32),
        "raw_fp16": RawTensor(w.half(), torch.float32),
        "raw_bf16": RawTensor(w.to(torch.bfloat16), torch.bfloat16),
        "count": RawTensor(torch.tensor(5865), torch.int64),
        "uniform": UniformTensor(codes.to(torch.int32), torch.linspace(0.01, 0.08, 8), None, 5,
                                 0),
        "uniform_layer": UniformTensor(codes.to(torch.int32), torch.tensor([0.03]), None, 5,
                                       None),
        "kmeans": ScalarCodebookTensor(torch.linspace(-0.5, 0.5, 32), indices),
        "kmeans_zstd": ScalarCodebookTensor(torch.linspace(-0.5, 0.5, 32), indices.flip(0)),
        "pq": VectorCodebookTensor(torch.randn(16, 9, generator=g).half(),
                                   torch.randint(0, 16, (32,), generator=g), (8, 4, 3, 3)),
        "pq_raw": VectorCodebookTensor(torch.randn(16, 9, generator=g),
                                       torch.randint(0, 16, (32,), generator=g), (8, 4, 3, 3)),
    }


# The second golden file, sparse-v1.fb: pruned tensors whose streams use the `runs` coder (added
# after tiny-v1.fb, which must stay byte for byte as it was).
SPARSE_CODERS = {"pruned_kmeans": "runs", "pruned_uniform": "runs", "pruned_raw": "runs",
                 "dense_kmeans": "ans"}


def sparse_tensors() -> dict[str, CompressedTensor]:
    g = torch.Generator().manual_seed(4321)
    keep = torch.rand(16, 8, 3, 3, generator=g) < 0.15
    keep[3] = False  # a pruned filter: one long run
    indices = torch.where(keep, torch.randint(1, 16, (16, 8, 3, 3), generator=g), 0)
    codes = torch.where(keep, torch.randint(-7, 8, (16, 8, 3, 3), generator=g), 0)
    values = torch.where(keep, torch.randn(16, 8, 3, 3, generator=g), 0.0)
    book = torch.cat([torch.zeros(1), torch.linspace(-0.3, 0.3, 15)])
    return {
        "pruned_kmeans": ScalarCodebookTensor(book, indices),
        "pruned_uniform": UniformTensor(codes.to(torch.int32), torch.linspace(0.01, 0.04, 16),
                                        None, 4, 0),
        "pruned_raw": RawTensor(values.half(), torch.float32),
        "dense_kmeans": ScalarCodebookTensor(book, indices.flip(1)),
    }


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: what the golden file must decode to."""
    raw = tensor.contiguous()
    if raw.dtype == torch.bfloat16:
        raw = raw.view(torch.int16)
    head = f"{tensor.dtype}|{tuple(tensor.shape)}|".encode()
    return hashlib.sha256(head + raw.numpy().tobytes()).hexdigest()
