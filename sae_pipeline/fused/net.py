"""Fused side-nets (issue #6): one small network per hooked layer for the composed multi-behaviour feature delta.

  delta_hat(a) = W2 (gate_H * relu(W1 a_w + b1)),   a_w = (a - mean_D) / std_D,   gate_H = sum_g alpha_g film_GH

The per-behaviour FiLM gates (film_GH) scale the hidden units, so behaviours switch at run time without retraining;
delta_hat is linear in the alphas (behaviours compose exactly) and exactly 0 with every alpha at 0. `from_sidecar`
folds a grouped sidecar in: one hidden unit per feature (W1 row: its encoder direction in whitened coordinates, b1:
minus its threshold, W2 column: minus its steering direction, film: its group). That reproduces the runtime's feature
rule on every token where a group fires; where a group's features stay within epsilon the runtime leaves the token
alone and the fold still adds their small remainder, which distillation (fused/distill.py) then trains away."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.hashing import file_sha256
from sae_pipeline.steering.sidecar import DenseSidecar

HIDDEN = 128  # issue #6


class FusedNet(nn.Module):
    def __init__(self, d_model: int, behaviors: tuple[str, ...], hidden: int = HIDDEN):
        super().__init__()
        if not behaviors or len(set(behaviors)) != len(behaviors):
            raise ValueError(f"a fused net needs distinct behaviour names, got {list(behaviors)}")
        self.behaviors = tuple(behaviors)
        self.register_buffer("mean_D", torch.zeros(d_model))
        self.register_buffer("inv_std_D", torch.ones(d_model))
        self.W1_HD = nn.Parameter(torch.zeros(hidden, d_model))
        self.b1_H = nn.Parameter(torch.zeros(hidden))
        self.W2_DH = nn.Parameter(torch.zeros(d_model, hidden))
        self.film_GH = nn.Parameter(torch.zeros(len(behaviors), hidden))

    @property
    def hidden(self) -> int:
        return self.W1_HD.shape[0]

    @property
    def d_model(self) -> int:
        return self.W1_HD.shape[1]

    def forward(self, acts_ND: torch.Tensor, alphas_G: torch.Tensor) -> torch.Tensor:
        """acts (..., d_model), alphas (behaviours,) -> delta (..., d_model) in the activations' dtype."""
        a_w = (acts_ND.float() - self.mean_D) * self.inv_std_D
        hidden_NH = torch.relu(a_w @ self.W1_HD.T + self.b1_H)
        gate_H = alphas_G.to(self.film_GH.device).float() @ self.film_GH
        return ((hidden_NH * gate_H) @ self.W2_DH.T).to(acts_ND.dtype)

    @classmethod
    def from_sidecar(cls, sidecar: DenseSidecar, groups: dict[str, int], stats: WhiteningStats,
                     hidden: int = HIDDEN) -> FusedNet:
        """The grouped sidecar (rows in `groups`' order) folded in exactly, whitened with the layer's activation
        statistics (activations/store.py); unused hidden units start at 0."""
        n, d_model = sidecar.A_sel_ND.shape
        if sum(groups.values()) != n:
            raise ValueError(f"groups {groups} do not cover the sidecar's {n} features")
        if n > hidden:
            raise ValueError(f"the sidecar holds {n} features, more than the {hidden} hidden units of a fused net")
        if stats.mean_D.shape != (d_model,) or stats.std_D.shape != (d_model,) or not (stats.std_D > 0).all():
            raise ValueError(f"layer statistics must be ({d_model},) with a positive std, got "
                             f"{tuple(stats.mean_D.shape)} and {tuple(stats.std_D.shape)}")
        net = cls(d_model, tuple(groups), hidden)
        std_D, mean_D = stats.std_D.float(), stats.mean_D.float()
        with torch.no_grad():
            net.mean_D.copy_(mean_D)
            net.inv_std_D.copy_(1 / std_D)
            # B . a - tau with a = mean + std * a_w:  (B * std) . a_w + (B . mean - tau)
            net.W1_HD[:n] = sidecar.B_sel_ND.float() * std_D
            net.b1_H[:n] = sidecar.B_sel_ND.float() @ mean_D - sidecar.tau_N.float()
            net.W2_DH[:, :n] = -sidecar.A_sel_ND.float().T
            start = 0
            for g, size in enumerate(groups.values()):
                net.film_GH[g, start:start + size] = 1.0
                start += size
        return net


class FusedNetError(ValueError):
    """A fused net file is missing, unreadable, malformed or does not match its recorded sha256."""


def save_fused(net: FusedNet, path: Path) -> str:
    """safetensors, the behaviours' order in its header; returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().float().cpu().contiguous() for name, t in net.state_dict().items()}, path,
              metadata={"behaviors": json.dumps(list(net.behaviors))})
    return file_sha256(path)


def load_fused(path: Path, sha256: str | None = None) -> FusedNet:
    """The net in `path`, verified against sha256 when one is recorded; fails closed with FusedNetError."""
    try:
        if sha256 is not None and file_sha256(path) != sha256:
            raise FusedNetError(f"{path} does not match its recorded sha256")
        with safe_open(path, "pt") as f:
            behaviors = tuple(json.loads((f.metadata() or {})["behaviors"]))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        hidden, d_model = tensors["W1_HD"].shape
        net = FusedNet(d_model, behaviors, hidden)
        net.load_state_dict(tensors)
        return net
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as err:
        if isinstance(err, FusedNetError):
            raise
        raise FusedNetError(f"cannot read the fused net {path}: {err}") from err
