"""Steering sidecars: the selected features' directions and thresholds, dense (safetensors) or compressed (SAE8).

A sidecar holds, for n selected SAE features at one hook point of width d_model:
  A_sel_ND  decoder directions (what steering subtracts),
  B_sel_ND  encoder directions (what detects the feature),
  tau_N     per-feature thresholds, so that s - tau is the SAE pre-activation; for the TopKSAE's
            pre = (x - b_dec) W_enc + b_enc that is tau_j = b_dec . W_enc[:, j] - b_enc[j].
SAE8 stores each row sparsely (the nnz largest-magnitude entries, uint16 index + int8 value + fp16 absmax scale) and
ends in a CRC32; docs/sidecar_format.md is the byte-level specification. Every reader fails with SidecarError on
bad magic, version, sizes, truncation or checksum: never a silent load, never another exception."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sae_pipeline.hashing import file_sha256

SAE8_MAGIC = b"SAE8"
SAE8_VERSION = 1
_PREAMBLE = struct.Struct("<4sHHI")  # magic, version, flags, header length
_TENSORS = ("A_sel", "B_sel")
_MAX_HEADER = 4096


class SidecarError(ValueError):
    """A sidecar is malformed, truncated, corrupt or does not match its recorded hash."""


class DenseSidecar(NamedTuple):
    A_sel_ND: torch.Tensor
    B_sel_ND: torch.Tensor
    tau_N: torch.Tensor

    def validate(self) -> DenseSidecar:
        n, d = self.A_sel_ND.shape
        if self.B_sel_ND.shape != (n, d) or self.tau_N.shape != (n,):
            raise SidecarError(f"inconsistent sidecar shapes: A_sel {tuple(self.A_sel_ND.shape)}, B_sel "
                               f"{tuple(self.B_sel_ND.shape)}, tau {tuple(self.tau_N.shape)}")
        if not all(torch.isfinite(t).all() for t in self):
            raise SidecarError("sidecar holds non-finite values")
        return self


def _groups_field(sidecar: DenseSidecar, groups: dict[str, int] | None) -> list | None:
    """[[name, features], ...] for a header, checked against the sidecar: groups cover its rows in order."""
    if groups is None:
        return None
    if not groups or any(n <= 0 for n in groups.values()) or sum(groups.values()) != len(sidecar.tau_N):
        raise SidecarError(f"groups {groups} must be non-empty and cover the sidecar's {len(sidecar.tau_N)} features")
    return [[name, int(n)] for name, n in groups.items()]


def save_dense(sidecar: DenseSidecar, path: Path, groups: dict[str, int] | None = None) -> str:
    """safetensors with A_sel, B_sel, tau (float32), and the feature groups (name -> count, in row order) in its
    metadata when given; returns the file's sha256."""
    sidecar.validate()
    field = _groups_field(sidecar, groups)
    save_file({"A_sel": sidecar.A_sel_ND.float().contiguous(), "B_sel": sidecar.B_sel_ND.float().contiguous(),
               "tau": sidecar.tau_N.float().contiguous()}, path,
              metadata=None if field is None else {"groups": json.dumps(field)})
    return file_sha256(path)


def load_dense(path: Path, sha256: str | None = None) -> DenseSidecar:
    try:
        if sha256 is not None and file_sha256(path) != sha256:
            raise SidecarError(f"{path} does not match its recorded sha256")
        tensors = load_file(path)
        return DenseSidecar(tensors["A_sel"], tensors["B_sel"], tensors["tau"]).validate()
    except (OSError, SafetensorError, KeyError) as err:
        raise SidecarError(f"cannot read dense sidecar {path}: {err}") from err


def _sparse_rows(rows_ND: np.ndarray, nnz: int) -> bytes:
    out = []
    for row in rows_ND:
        indices = np.sort(np.argsort(-np.abs(row), kind="stable")[:nnz]).astype("<u2")
        values = row[indices]
        scale = np.float16(np.abs(values).max() / 127 if np.abs(values).max() > 0 else 1.0)
        quantised = np.clip(np.rint(values / np.float32(scale)), -127, 127).astype("i1")
        out += [indices.tobytes(), quantised.tobytes(), np.array([scale], dtype="<f2").tobytes()]
    return b"".join(out)


def encode_sae8(sidecar: DenseSidecar, nnz_per_feature: int, groups: dict[str, int] | None = None) -> bytes:
    """SAE8 bytes: each row keeps its nnz largest-magnitude entries (absmax int8 per row); a grouped sidecar's
    header lists its groups (name and feature count, in row order)."""
    sidecar.validate()
    n, d = sidecar.A_sel_ND.shape
    if not 0 < nnz_per_feature <= d or d > 65535:
        raise SidecarError(f"nnz_per_feature must be in 1..{d} and d_model <= 65535 (uint16 indices)")
    fields = {"checksum": "crc32", "d_model": d, "dtypes": "u16/i8/f16", "n_features": n,
              "nnz_per_feature": nnz_per_feature, "quantization": "absmax-int8", "tensors": ",".join(_TENSORS)}
    if groups is not None:
        fields["groups"] = _groups_field(sidecar, groups)
    header = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    body = b"".join(_sparse_rows(t.detach().float().cpu().numpy(), nnz_per_feature)
                    for t in (sidecar.A_sel_ND, sidecar.B_sel_ND))
    tau_N = sidecar.tau_N.detach().cpu().float().numpy()
    if np.abs(tau_N).max(initial=0) > 65504:
        raise SidecarError("tau exceeds the fp16 range of SAE8; keep the dense sidecar for this layer")
    body += tau_N.astype("<f2").tobytes()
    payload = _PREAMBLE.pack(SAE8_MAGIC, SAE8_VERSION, 0, len(header)) + header + body
    return payload + struct.pack("<I", zlib.crc32(payload))


def decode_sae8(blob: bytes) -> DenseSidecar:
    """The dense sidecar an SAE8 file stands for; SidecarError on anything malformed."""
    if len(blob) < _PREAMBLE.size + 4:
        raise SidecarError(f"SAE8 file truncated: {len(blob)} bytes")
    magic, version, _flags, header_len = _PREAMBLE.unpack_from(blob)
    if magic != SAE8_MAGIC:
        raise SidecarError(f"not an SAE8 sidecar (magic {magic!r})")
    if version != SAE8_VERSION:
        raise SidecarError(f"unsupported SAE8 version {version} (this reader knows {SAE8_VERSION})")
    (crc,) = struct.unpack_from("<I", blob, len(blob) - 4)
    if zlib.crc32(blob[:-4]) != crc:
        raise SidecarError("SAE8 CRC32 mismatch: the file is corrupt or truncated")
    if header_len > _MAX_HEADER or _PREAMBLE.size + header_len > len(blob) - 4:
        raise SidecarError(f"SAE8 header length {header_len} does not fit the file")
    try:
        header = json.loads(blob[_PREAMBLE.size:_PREAMBLE.size + header_len].decode())
        d, n, nnz = int(header["d_model"]), int(header["n_features"]), int(header["nnz_per_feature"])
        groups = header.get("groups")
        if groups is not None and (sum(int(count) for _, count in groups) != n or
                                   any(int(count) <= 0 for _, count in groups)):
            raise ValueError(f"groups {groups} do not cover its {n} features")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise SidecarError(f"SAE8 header is not valid: {err}") from err
    if not (0 < nnz <= d <= 65535 and n > 0):
        raise SidecarError(f"SAE8 header sizes out of range: d_model {d}, n_features {n}, nnz {nnz}")
    row_bytes = nnz * 3 + 2
    offset = _PREAMBLE.size + header_len
    if offset + 2 * n * row_bytes + 2 * n != len(blob) - 4:
        raise SidecarError("SAE8 body size does not match its header")
    tensors = []
    for _ in _TENSORS:
        dense_ND = np.zeros((n, d), dtype=np.float32)
        for row in range(n):
            indices = np.frombuffer(blob, dtype="<u2", count=nnz, offset=offset).astype(np.int64)
            values = np.frombuffer(blob, dtype="i1", count=nnz, offset=offset + 2 * nnz).astype(np.float32)
            scale = np.frombuffer(blob, dtype="<f2", count=1, offset=offset + 3 * nnz).astype(np.float32)[0]
            offset += row_bytes
            if indices.max() >= d or len(np.unique(indices)) != nnz:
                raise SidecarError("SAE8 row indices out of range or repeated")
            dense_ND[row, indices] = values * scale
        tensors.append(torch.from_numpy(dense_ND))
    tau_N = torch.from_numpy(np.frombuffer(blob, dtype="<f2", count=n, offset=offset).astype(np.float32))
    return DenseSidecar(*tensors, tau_N).validate()


def write_sae8(sidecar: DenseSidecar, path: Path, nnz_per_feature: int, groups: dict[str, int] | None = None) -> str:
    path.write_bytes(encode_sae8(sidecar, nnz_per_feature, groups))
    return file_sha256(path)


def read_sae8(path: Path, sha256: str | None = None) -> DenseSidecar:
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise SidecarError(f"cannot read {path}: {err}") from err
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise SidecarError(f"{path} does not match its recorded sha256")
    return decode_sae8(blob)



def load_sidecar(path: Path, sha256: str | None = None) -> DenseSidecar:
    """A dense (.safetensors) or SAE8 (.sae8) sidecar, by its suffix."""
    return read_sae8(path, sha256) if path.suffix == ".sae8" else load_dense(path, sha256)

def sidecar_groups(path: Path) -> dict[str, int] | None:
    """A grouped sidecar's groups (name -> feature count, in row order) from its header or metadata; None if it has
    none. Read after the file's checksum or sha256 was verified."""
    try:
        if path.suffix == ".sae8":
            blob = path.read_bytes()
            _magic, _version, _flags, header_len = _PREAMBLE.unpack_from(blob)
            field = json.loads(blob[_PREAMBLE.size:_PREAMBLE.size + header_len].decode()).get("groups")
        else:
            with safe_open(path, "pt") as handle:
                field = json.loads((handle.metadata() or {}).get("groups", "null"))
        return None if field is None else {str(name): int(count) for name, count in field}
    except (OSError, ValueError, TypeError, SafetensorError, struct.error) as err:
        raise SidecarError(f"cannot read the groups of {path}: {err}") from err
