"""Representation cross-talk between behaviours: the decoder directions one behaviour steers along must be nearly
orthogonal to every direction fixed for the others.

Behaviours take turns (round robin, so the first cannot fill the space before the others start), each taking its
next-best ranked candidate whose max |cos| with the directions already fixed for *other* behaviours is <= `max_cos`.
A behaviour whose clean candidates run out before `keep` turns to the rejected ones, again in turns and rank order:
each is deflated against the others' directions U (A_i <- A_i - U(U^T A_i), renormalised) and admitted, flagged, when
its final |cos| with them is <= `flagged_max_cos` and deflation left it at least `min_deflated_norm` of its length
(a direction the others mostly span is no direction of its own). The report holds, per behaviour pair, the largest
|cos| between their final directions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.tensorfiles import load_tensors, save_tensors


class BehaviorSelection(NamedTuple):
    feature_ids: list[int]  # in rank order
    directions_ND: torch.Tensor  # unit steering directions (deflated where flagged)
    flagged: list[bool]  # admitted above max_cos, after deflation
    raw_max_cos: list[float]  # each kept feature's max |cos| with the others' directions when it was fixed


class CrosstalkResult(NamedTuple):
    selections: dict[str, BehaviorSelection]
    pair_max_cos: dict[str, float]  # "a|b" -> max |cos| between the two behaviours' final directions
    shortfall: dict[str, int]  # behaviour -> how many fewer than `keep` it could keep


def _unit(rows_ND: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows_ND.double(), dim=-1)


class _Kept(NamedTuple):
    rank: int
    direction_D: torch.Tensor
    flagged: bool
    raw_max_cos: float


def select_without_crosstalk(ranked: dict[str, Sequence[int]], W_dec_FD: torch.Tensor, keep: int, max_cos: float,
                             flagged_max_cos: float, min_deflated_norm: float = 0.5) -> CrosstalkResult:
    """ranked: behaviour -> candidate latent ids, best first; the dict's order is the order of each round."""
    decoder_FD = _unit(W_dec_FD)
    kept: dict[str, list[_Kept]] = {b: [] for b in ranked}
    rejected: dict[str, list[int]] = {b: [] for b in ranked}  # ranks that failed max_cos, for the flagged pass

    def others_MD(behavior: str) -> torch.Tensor:
        rows = [k.direction_D for other, ks in kept.items() if other != behavior for k in ks]
        return torch.stack(rows) if rows else torch.zeros(0, decoder_FD.shape[1], dtype=torch.float64)

    def admit_clean(behavior: str, next_rank: dict[str, int]) -> bool:
        candidates, others = ranked[behavior], others_MD(behavior)
        while next_rank[behavior] < len(candidates):
            rank = next_rank[behavior]
            next_rank[behavior] += 1
            row_D = decoder_FD[candidates[rank]]
            raw = float((others @ row_D).abs().max()) if len(others) else 0.0
            if raw <= max_cos:
                kept[behavior].append(_Kept(rank, row_D, False, raw))
                return True
            rejected[behavior].append(rank)
        return False

    def admit_flagged(behavior: str, next_index: dict[str, int]) -> bool:
        candidates, others = ranked[behavior], others_MD(behavior)
        while next_index[behavior] < len(rejected[behavior]):
            rank = rejected[behavior][next_index[behavior]]
            next_index[behavior] += 1
            row_D = decoder_FD[candidates[rank]]
            deflated_D = row_D - others.T @ (others @ row_D)
            if deflated_D.norm() < min_deflated_norm:
                continue
            deflated_D = deflated_D / deflated_D.norm()
            if float((others @ deflated_D).abs().max()) <= flagged_max_cos:
                kept[behavior].append(_Kept(rank, deflated_D, True, float((others @ row_D).abs().max())))
                return True
        return False

    for admit in (admit_clean, admit_flagged):
        cursor = {b: 0 for b in ranked}
        active = [b for b in ranked if len(kept[b]) < keep]
        while active:  # one candidate per behaviour per round
            active = [b for b in active if admit(b, cursor) and len(kept[b]) < keep]

    selections = {}
    for behavior, ks in kept.items():
        ks = sorted(ks, key=lambda k: k.rank)
        selections[behavior] = BehaviorSelection(
            [int(ranked[behavior][k.rank]) for k in ks],
            torch.stack([k.direction_D for k in ks]) if ks else torch.zeros(0, decoder_FD.shape[1],
                                                                           dtype=torch.float64),
            [k.flagged for k in ks], [round(k.raw_max_cos, 6) for k in ks])
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


class PinnedSelection(NamedTuple):
    directions_ND: torch.Tensor
    flagged_N: torch.Tensor
    feature_ids: list[int]


def load_directions(path: Path, sha256: str) -> dict[str, PinnedSelection]:
    """behaviour -> its selection as saved, verified against sha256."""
    tensors = load_tensors(path, sha256)
    behaviors = sorted({name.split(".")[0] for name in tensors})
    return {b: PinnedSelection(tensors[f"{b}.directions_ND"].double(), tensors[f"{b}.flagged"].bool(),
                               [int(i) for i in tensors[f"{b}.feature_ids"].tolist()]) for b in behaviors}


def pair_max_cos(directions: dict[str, torch.Tensor]) -> dict[str, float]:
    """"a|b" -> the largest |cos| between two behaviours' unit directions (0 where either has none)."""
    names = list(directions)
    out = {}
    for a_index, a in enumerate(names):
        for b in names[a_index + 1:]:
            da, db = directions[a], directions[b]
            out[f"{a}|{b}"] = round(float((da @ db.T).abs().max()), 6) if len(da) and len(db) else 0.0
    return out


def crosstalk_extremes(final: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(max |cos| between two behaviours' unflagged directions, max |cos| where either direction is flagged), from
    behaviour -> (unit directions_ND, flagged_N): what the cos and flagged-cos gates bound."""
    clean, flagged = 0.0, 0.0
    names = list(final)
    for a_index, a in enumerate(names):
        for b in names[a_index + 1:]:
            (da, fa), (db, fb) = final[a], final[b]
            if not len(da) or not len(db):
                continue
            cos_AB = (da.double() @ db.double().T).abs()
            either_AB = fa.bool()[:, None] | fb.bool()[None, :]
            clean = max(clean, float(cos_AB[~either_AB].max()) if (~either_AB).any() else 0.0)
            flagged = max(flagged, float(cos_AB[either_AB].max()) if either_AB.any() else 0.0)
    return clean, flagged


def crosstalk_measures(report: dict) -> dict[str, float]:
    """What the cross-talk gates bound, recomputed from each layer's hash-pinned directions and its SAE (never read
    from the report's numbers): crosstalk_cos_max, crosstalk_flagged_cos_max (see `crosstalk_extremes`) and
    crosstalk_shortfall_max (how many fewer than the report's `keep` a behaviour kept). Raises ValueError when the
    SAE changed or an unflagged direction is not the SAE's own decoder column."""
    measured = {"crosstalk_cos_max": 0.0, "crosstalk_flagged_cos_max": 0.0, "crosstalk_shortfall_max": 0}
    for layer, entry in report["layers"].items():
        sae, sae_cfg = TopKSAE.load(Path(entry["sae_path"]))
        if sae_cfg["sae_hash"] != entry["sae_hash"]:
            raise ValueError(f"layer {layer}: the SAE changed since the cross-talk selection; select again")
        pinned = load_directions(Path(entry["directions"]["path"]), entry["directions"]["sha256"])
        decoder_FD = _unit(sae.W_dec_FD.detach())
        for behavior, selection in pinned.items():  # the hash-pinned ids, never the report's copy
            if selection.feature_ids != entry["behaviors"][behavior]["feature_ids"]:
                raise ValueError(f"layer {layer}: the report's {behavior} features differ from the pinned selection")
            clean_ids = [i for i, flagged in zip(selection.feature_ids, selection.flagged_N.tolist()) if not flagged]
            if clean_ids and not torch.allclose(selection.directions_ND[~selection.flagged_N], decoder_FD[clean_ids],
                                                atol=1e-6):
                raise ValueError(f"layer {layer}: {behavior}'s unflagged directions are not the SAE's decoder "
                                 "columns; select again")
            measured["crosstalk_shortfall_max"] = max(measured["crosstalk_shortfall_max"],
                                                      report["keep"] - len(selection.feature_ids))
        clean, flagged = crosstalk_extremes({b: (s.directions_ND, s.flagged_N) for b, s in pinned.items()})
        measured["crosstalk_cos_max"] = max(measured["crosstalk_cos_max"], clean)
        measured["crosstalk_flagged_cos_max"] = max(measured["crosstalk_flagged_cos_max"], flagged)
    return measured
