"""Steering sidecars: dense and SAE8 round trips, the size budget, and a fuzz test of the SAE8 reader."""

import random
import struct
import zlib

import pytest
import torch

from sae_pipeline.steering.sidecar import (
    DenseSidecar, SidecarError, decode_sae8, encode_sae8, load_dense, read_sae8, save_dense, write_sae8)


def _sparse_sidecar(n, d, nnz, seed=0):
    """Unit-norm rows with exactly nnz non-zeros, as the selection step writes them."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2 * n):
        row = torch.zeros(d)
        row[torch.randperm(d, generator=generator)[:nnz]] = torch.randn(nnz, generator=generator)
        rows.append(row / row.norm())
    A, B = torch.stack(rows[:n]), torch.stack(rows[n:])
    return DenseSidecar(A, B, torch.rand(n, generator=generator))


def test_sae8_meets_the_size_and_error_budget_at_mistral_width():
    sidecar = _sparse_sidecar(n=8, d=4096, nnz=256)
    blob = encode_sae8(sidecar, nnz_per_feature=256)
    assert len(blob) <= 12_500
    decoded = decode_sae8(blob)
    for before, after in zip(sidecar, decoded):
        assert (before - after).abs().max() <= 1e-3


def test_sae8_keeps_the_largest_entries_of_dense_rows():
    dense = DenseSidecar(torch.tensor([[0.9, -0.05, 0.0, -0.4]]), torch.tensor([[0.0, 1.0, 0.2, 0.0]]),
                         torch.tensor([0.25]))
    decoded = decode_sae8(encode_sae8(dense, nnz_per_feature=2))
    assert torch.allclose(decoded.A_sel_ND, torch.tensor([[0.9, 0.0, 0.0, -0.4]]), atol=4e-3)
    assert torch.allclose(decoded.B_sel_ND, torch.tensor([[0.0, 1.0, 0.2, 0.0]]), atol=4e-3)
    assert torch.allclose(decoded.tau_N, torch.tensor([0.25]), atol=1e-3)


def test_dense_round_trip_and_hash_check(tmp_path):
    sidecar = _sparse_sidecar(n=3, d=64, nnz=64)
    sha = save_dense(sidecar, tmp_path / "dense.safetensors")
    loaded = load_dense(tmp_path / "dense.safetensors", sha)
    assert all(torch.equal(a, b) for a, b in zip(sidecar, loaded))
    with pytest.raises(SidecarError, match="does not match its recorded sha256"):
        load_dense(tmp_path / "dense.safetensors", "0" * 64)
    with pytest.raises(SidecarError, match="inconsistent sidecar shapes"):
        save_dense(DenseSidecar(sidecar.A_sel_ND, sidecar.B_sel_ND[:2], sidecar.tau_N), tmp_path / "bad.st")


def _recrc(blob: bytes) -> bytes:
    return blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))


def test_sae8_named_failures(tmp_path):
    blob = encode_sae8(_sparse_sidecar(n=2, d=32, nnz=8), 8)
    cases = {
        "not an SAE8 sidecar": b"SAE9" + blob[4:],
        "unsupported SAE8 version 2": blob[:4] + struct.pack("<H", 2) + blob[6:],
        "CRC32 mismatch": blob[:40] + bytes([blob[40] ^ 1]) + blob[41:],
        "truncated": blob[:10],
        "body size does not match": _recrc(blob[:-6] + blob[-4:]),
        "header sizes out of range": _recrc(blob.replace(b'"nnz_per_feature":8', b'"nnz_per_feature":0')),
    }
    for message, bad in cases.items():
        with pytest.raises(SidecarError, match=message):
            decode_sae8(bad)
    path = tmp_path / "s.sae8"
    sha = write_sae8(_sparse_sidecar(n=2, d=32, nnz=8), path, 8)
    assert read_sae8(path, sha).A_sel_ND.shape == (2, 32)
    with pytest.raises(SidecarError, match="recorded sha256"):
        read_sae8(path, "f" * 64)


def test_fuzzed_sae8_files_fail_only_with_sidecar_errors():
    """Random truncations, bit flips and byte splices, with the CRC fixed up half the time so the parser behind it
    is exercised too: every outcome is a valid sidecar or a SidecarError, never another exception."""
    blob = encode_sae8(_sparse_sidecar(n=3, d=48, nnz=12), 12)
    rng = random.Random(0)
    outcomes = {"error": 0, "loaded": 0}
    for _ in range(3000):
        mutated = bytearray(blob)
        kind = rng.randrange(3)
        if kind == 0:
            mutated = mutated[:rng.randrange(len(blob))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        else:
            start = rng.randrange(len(mutated))
            mutated[start:start + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 16)))
        data = bytes(mutated)
        if rng.random() < 0.5 and len(data) >= 4:
            data = _recrc(data)
        try:
            decoded = decode_sae8(data)
        except SidecarError:
            outcomes["error"] += 1
        else:
            assert decoded.A_sel_ND.shape[1] <= 65535
            outcomes["loaded"] += 1
    assert outcomes["error"] > 2000
