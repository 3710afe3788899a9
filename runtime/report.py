"""Size report of a packed file, from bytes on disk: per tensor, totals, and by section."""

from __future__ import annotations

import json
import os
from typing import Any

from runtime.errors import printable
from runtime.format.preamble import Preamble
from runtime.format.reader import PackedFile
from runtime.format.records import ModelRecord, TensorRecord

QUANTIZED = ("uniform", "scalar_codebook", "vector_codebook")


def _levels(t: TensorRecord) -> str:
    if t.scheme == "uniform":
        return f"{t.bits}b"
    if t.scheme in ("scalar_codebook", "vector_codebook") and t.codebook is not None:
        k = t.codebook.shape[0] if t.codebook.shape else "?"  # a 0-d codebook does not decode
        return f"K={k}" + (f"x{t.subvector_size}" if t.scheme == "vector_codebook" else "")
    return t.values_dtype


def tensor_row(t: TensorRecord) -> dict[str, Any]:
    streams = t.streams()
    stream_bytes = sum(s.blob.length + s.params_nbytes() for _, s in streams)
    array_bytes = sum(a.blob.length for _, a in t.arrays())
    coded = stream_bytes + array_bytes
    # The order-0 entropy bound of the streams, in bytes, plus the arrays stored as they are.
    bound = sum(s.entropy_bits * s.count / 8 for _, s in streams) + array_bytes
    return {
        "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "scheme": t.scheme,
        "levels": _levels(t), "coder": "+".join(s.coder for _, s in streams) or "-",
        "coded_bytes": coded, "stream_bytes": stream_bytes, "array_bytes": array_bytes,
        "bits_per_weight": 8 * coded / t.numel if t.numel else 0.0,
        "entropy_bits": max((s.entropy_bits for _, s in streams), default=0.0),
        "bound_bytes": round(bound, 1), "numel": t.numel,
    }


def _index_strings(m: ModelRecord) -> tuple[int, int]:
    arch = len(m.architecture.builder.encode()) + len(m.architecture.kwargs_json.encode())
    meta = sum(len(s.encode()) for s in (m.producer, m.method, m.method_config_json,
                                          m.source_sha256, m.metadata_json, *m.class_names))
    return arch, meta


def params_of(model, role: str) -> int:
    return sum(s.params_nbytes() for t in model.tensors for r, s in t.streams() if r == role)


def build_report(packed: PackedFile) -> dict[str, Any]:
    """Everything `inspect` and `compress` print, as one JSON-ready dict."""
    return size_report(packed.model, packed.preamble, packed.index_raw_size, packed.path)


def size_report(m: ModelRecord, preamble: Preamble, index_raw_size: int,
                path: str | os.PathLike) -> dict[str, Any]:
    """The report from the index records and the file's layout: what a reader finds in the
    file, and what the writer knows before writing it."""
    file_bytes = preamble.file_size
    rows = [tensor_row(t) for t in m.tensors]
    quantized = [r for r, t in zip(rows, m.tensors, strict=True) if t.scheme in QUANTIZED]
    q_bytes = sum(r["coded_bytes"] for r in quantized)
    q_weights = sum(r["numel"] for r in quantized)
    n_float = sum(r["numel"] for r in rows if r["dtype"].startswith(("float", "bfloat")))

    sections = {"codebooks": 0, "indices": 0, "raw_tensors": 0}
    params = 0
    for t in m.tensors:
        for role, s in t.streams():
            params += s.params_nbytes()
            sections["indices" if role == "indices" else "raw_tensors"] += (
                s.blob.length + s.params_nbytes())
        sections["codebooks"] += sum(a.blob.length for _, a in t.arrays())
    # Parameters and strings live in the index; when it is zstd-compressed, charge them
    # at the index's compression rate so every figure is in bytes actually stored.
    rate = preamble.index_size / index_raw_size
    params = round(params * rate)
    sections["indices"] = round(sections["indices"] - params_of(m, "indices") * (1 - rate))
    sections["raw_tensors"] = round(sections["raw_tensors"] - params_of(m, "values") * (1 - rate))
    arch_strings, meta_strings = (round(n * rate) for n in _index_strings(m))
    graph = m.architecture.graph.length if m.architecture.graph else 0
    sections["architecture"] = arch_strings + graph
    sections["metadata"] = meta_strings
    blob_total = sum(ref.length for _, ref in m.blobs())
    index_padding = preamble.data_offset - preamble.index_offset - preamble.index_size
    sections["padding"] = index_padding + preamble.data_size - blob_total
    sections["preamble_index"] = 0
    sections["preamble_index"] = file_bytes - sum(sections.values())

    config = json.loads(m.method_config_json)
    return {
        "file": str(path), "file_bytes": file_bytes, "fp32_bytes": m.fp32_bytes,
        "ratio": m.fp32_bytes / file_bytes if file_bytes else 0.0,
        "bits_per_weight": 8 * q_bytes / q_weights if q_weights else 0.0,
        "bits_per_parameter": 8 * file_bytes / n_float if n_float else 0.0,
        "compressed_weights": q_weights, "parameters": n_float,
        "method": m.method, "config": config, "producer": m.producer,
        "architecture": {"kind": m.architecture.kind, "builder": m.architecture.builder,
                         "kwargs": json.loads(m.architecture.kwargs_json)},
        "input": m.input.as_dict(), "num_classes": m.num_classes,
        "class_names": list(m.class_names),
        "source_sha256": m.source_sha256,
        "format": f"{preamble.major}.{preamble.minor}",
        "required_features": list(m.required_features),
        "activation_quant": [{"module": q.module, "bits": q.bits, "clip": q.clip}
                             for q in m.activation_quant],
        "channel_gates": [{"module": g.module, "keep": g.keep} for g in m.channel_gates],
        "sections": sections, "tensors": rows,
    }


def inspect_file(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """The report of a file on disk; with `verify`, every blob checksum is checked too."""
    with PackedFile(path) as packed:
        checked = packed.verify() if verify else None
        report = build_report(packed)
    if checked is not None:
        report["verified_blobs"] = checked
    return report


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def format_report(report: dict[str, Any], tensors: bool = True) -> str:
    """The human-readable report; every string that comes from the file is escaped."""
    lines = []
    if tensors:
        head = (f"{'tensor':<28} {'shape':<16} {'scheme':<15} {'levels':<9} {'coder':<8} "
                f"{'bytes':>9} {'bits/w':>7} {'H bits':>7} {'bound':>9}")
        lines += [head, "-" * len(head)]
        for r in report["tensors"]:
            shape = "x".join(map(str, r["shape"])) or "scalar"
            name = printable(r["name"])
            lines.append(
                f"{name[:28]:<28} {shape[:16]:<16} {r['scheme']:<15} {r['levels']:<9} "
                f"{r['coder']:<8} {r['coded_bytes']:>9,} {r['bits_per_weight']:>7.3f} "
                f"{r['entropy_bits']:>7.3f} {r['bound_bytes']:>9,.0f}")
        lines.append("")
    arch = report["architecture"]
    lines += [
        f"file        {printable(report['file'])}  (format {report['format']}, "
        f"{printable(report['producer'])})",
        f"method      {printable(report['method'])}  on "
        f"{printable(arch['builder'] or arch['kind'])}",
        f"file bytes  {report['file_bytes']:,}  ({_human(report['file_bytes'])}, on disk)",
        f"fp32 bytes  {report['fp32_bytes']:,}  ({_human(report['fp32_bytes'])})",
        f"ratio       {report['ratio']:.2f}x",
        f"bits/weight {report['bits_per_weight']:.3f} over {report['compressed_weights']:,} "
        f"compressed weights; {report['bits_per_parameter']:.3f} bits per parameter overall",
        "sections    " + ", ".join(f"{k} {v:,}" for k, v in report["sections"].items()),
    ]
    if report.get("required_features"):
        acts = report.get("activation_quant") or []
        bits = sorted({q["bits"] for q in acts})
        gates = report.get("channel_gates") or []
        notes = ([f"{len(acts)} layer inputs at {'/'.join(map(str, bits))} bits"] if acts
                 else []) + ([f"{len(gates)} gated convolutions"] if gates else [])
        lines.append("needs       " + ", ".join(report["required_features"])
                     + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)
