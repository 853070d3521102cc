"""Representation cross-talk between behaviours: the decoder directions one behaviour steers along must be nearly
orthogonal to every direction fixed for the others.

Behaviours are fixed one after another in a set order. For each, its ranked candidates are taken in rank order and
kept when max |cos| with the directions already fixed for *other* behaviours is <= `max_cos`. If fewer than `keep`
pass, the rest are admitted up to `flagged_max_cos`, their directions deflated against the others' span
(A_i <- A_i - U(U^T A_i), renormalised) and flagged in the report; a direction that deflation leaves with less than
`min_deflated_norm` of its length (the others span nearly all of it) is dropped. The report holds, per behaviour
pair, the largest |cos| between their final directions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from sae_pipeline.tensorfiles import load_tensors, save_tensors


class BehaviorSelection(NamedTuple):
    feature_ids: list[int]
    directions_ND: torch.Tensor  # unit steering directions (deflated where flagged)
    flagged: list[bool]  # admitted above max_cos, after deflation
    raw_max_cos: list[float]  # each kept feature's max |cos| with the others' directions before deflation


class CrosstalkResult(NamedTuple):
    selections: dict[str, BehaviorSelection]
    pair_max_cos: dict[str, float]  # "a|b" -> max |cos| between the two behaviours' final directions
    shortfall: dict[str, int]  # behaviour -> how many fewer than `keep` it could keep


def _unit(rows_ND: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows_ND.double(), dim=-1)


def select_without_crosstalk(ranked: dict[str, Sequence[int]], W_dec_FD: torch.Tensor, keep: int, max_cos: float,
                             flagged_max_cos: float, min_deflated_norm: float = 0.5) -> CrosstalkResult:
    """ranked: behaviour -> candidate latent ids, best first, in the order behaviours are fixed."""
    decoder_FD = _unit(W_dec_FD)
    selections: dict[str, BehaviorSelection] = {}
    for behavior, candidates in ranked.items():
        others_MD = torch.cat([s.directions_ND for s in selections.values()] or
                              [torch.zeros(0, decoder_FD.shape[1], dtype=torch.float64)])
        rows = decoder_FD[list(candidates)]
        raw_N = (rows @ others_MD.T).abs().amax(1) if len(others_MD) else torch.zeros(len(rows), dtype=torch.float64)
        clean = [i for i in range(len(rows)) if raw_N[i] <= max_cos][:keep]
        chosen, flagged = list(clean), [False] * len(clean)
        directions = [rows[i] for i in clean]
        if len(chosen) < keep and len(others_MD):
            basis_DR = torch.linalg.svd(others_MD.T, full_matrices=False).U  # orthonormal span of the others
            for i in range(len(rows)):
                if len(chosen) == keep:
                    break
                if i in clean or raw_N[i] > flagged_max_cos:
                    continue
                deflated_D = rows[i] - basis_DR @ (basis_DR.T @ rows[i])
                if deflated_D.norm() < min_deflated_norm:
                    continue
                chosen.append(i)
                flagged.append(True)
                directions.append(deflated_D / deflated_D.norm())
        order = sorted(range(len(chosen)), key=lambda j: chosen[j])  # back to rank order
        selections[behavior] = BehaviorSelection(
            [int(candidates[chosen[j]]) for j in order],
            torch.stack([directions[j] for j in order]) if chosen else torch.zeros(0, decoder_FD.shape[1],
                                                                                   dtype=torch.float64),
            [flagged[j] for j in order], [round(float(raw_N[chosen[j]]), 6) for j in order])
    return CrosstalkResult(selections, pair_max_cos({name: s.directions_ND for name, s in selections.items()}),
                           {name: keep - len(s.feature_ids) for name, s in selections.items()})


def save_selections(result: CrosstalkResult, path: Path) -> str:
    """Every behaviour's final directions and feature ids in one safetensors file; returns its sha256."""
    tensors = {}
    for behavior, selection in result.selections.items():
        tensors[f"{behavior}.directions_ND"] = selection.directions_ND
        tensors[f"{behavior}.feature_ids"] = torch.tensor(selection.feature_ids)  # stored as float32: exact < 2**24
        tensors[f"{behavior}.flagged"] = torch.tensor(selection.flagged)
    return save_tensors(tensors, path)


def load_directions(path: Path, sha256: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """behaviour -> (directions_ND, flagged_N), verified against sha256."""
    tensors = load_tensors(path, sha256)
    behaviors = sorted({name.split(".")[0] for name in tensors})
    return {b: (tensors[f"{b}.directions_ND"].double(), tensors[f"{b}.flagged"].bool()) for b in behaviors}


def pair_max_cos(directions: dict[str, torch.Tensor]) -> dict[str, float]:
    """"a|b" -> the largest |cos| between two behaviours' unit directions (0 where either has none)."""
    names = list(directions)
    out = {}
    for a_index, a in enumerate(names):
        for b in names[a_index + 1:]:
            da, db = directions[a], directions[b]
            out[f"{a}|{b}"] = round(float((da @ db.T).abs().max()), 6) if len(da) and len(db) else 0.0
    return out
