"""Held-out quality of a (folded) SAE: reconstruction, sparsity, liveness, decoder geometry, spliced loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sae_pipeline.model.hooks import mlp_module
from sae_pipeline.sae.model import TopKSAE


class ReconstructionMetrics(NamedTuple):
    mse: float
    r2: float
    fvu: float
    k_active_p5: float
    k_active_p50: float
    k_active_p95: float
    liveness_median: float  # firing frequency per latent over held-out tokens
    liveness_p10: float
    liveness_p90: float
    dead_fraction: float  # latents that never fire on the held-out tokens
    # Massive activations (Sun et al. 2024): a few attention-sink tokens with norms 10-1000x the rest. Where they
    # carry most of the variance, R2 mostly measures them, so R2 over the other tokens is kept too.
    massive_token_fraction: float
    massive_variance_share: float
    r2_ordinary: float  # R2 over the tokens that are not massive, about their own mean
    firing_frequency_F: torch.Tensor


class CoherenceMetrics(NamedTuple):
    mean: float  # over all pairs of distinct decoder directions, |cos|
    p95: float
    max: float
    near_duplicates: int  # pairs with |cos| above the merge threshold


class SpliceMetrics(NamedTuple):
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    kl_spliced: float  # mean per-token KL(clean || spliced)
    loss_recovered: float


def _quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    return torch.quantile(values.float(), torch.tensor(qs)).tolist()


MASSIVE_NORM_RATIO = 10.0  # a token is massive when its centred norm exceeds this multiple of the median's


@torch.no_grad()
def reconstruction_metrics(sae: TopKSAE, acts_ND: torch.Tensor, batch: int = 4096) -> ReconstructionMetrics:
    device = sae.W_enc_DF.device  # the SAE's device does the work; the tokens come to it a batch at a time
    k_active, fires_F, err_N = [], torch.zeros(sae.n_latents, device=device), []
    acts_ND = acts_ND.float()
    mean_D = acts_ND.mean(0)
    sq_norm_N = (acts_ND - mean_D).pow(2).sum(1)
    var_sum = float(sq_norm_N.sum())
    for start in range(0, acts_ND.shape[0], batch):
        x_BD = acts_ND[start:start + batch].to(device)
        codes = sae.encode(x_BD)
        recon_BD = sae.decode(codes.top_acts, codes.top_indices)
        err_N.append((recon_BD - x_BD).pow(2).sum(1).cpu())
        active_BK = codes.top_acts > 0
        k_active.append(active_BK.sum(-1).cpu())
        fires_F.index_add_(0, codes.top_indices[active_BK], torch.ones(int(active_BK.sum()), device=device))
    fires_F = fires_F.cpu()
    n = acts_ND.shape[0]
    err_N = torch.cat(err_N)
    err_sum = float(err_N.sum())
    freq_F = fires_F / n
    fvu = err_sum / max(var_sum, 1e-12)
    median = sq_norm_N.median()  # 0 when most tokens sit at the mean: then no token counts as massive
    massive_N = sq_norm_N > MASSIVE_NORM_RATIO ** 2 * median if median > 0 else torch.zeros(len(sq_norm_N), dtype=bool)
    ordinary_ND = acts_ND[~massive_N]
    ordinary_var = float((ordinary_ND - ordinary_ND.mean(0)).pow(2).sum()) if len(ordinary_ND) else 0.0
    r2_ordinary = 1 - float(err_N[~massive_N].sum()) / max(ordinary_var, 1e-12)
    kp5, kp50, kp95 = _quantiles(torch.cat(k_active), (0.05, 0.5, 0.95))
    lp10, lp50, lp90 = _quantiles(freq_F, (0.1, 0.5, 0.9))
    return ReconstructionMetrics(err_sum / (n * acts_ND.shape[1]), 1 - fvu, fvu, kp5, kp50, kp95, lp50, lp10, lp90,
                                 float((fires_F == 0).float().mean()), float(massive_N.float().mean()),
                                 float(sq_norm_N[massive_N].sum()) / max(var_sum, 1e-12), r2_ordinary, freq_F)


@torch.no_grad()
def coherence_metrics(W_dec_FD: torch.Tensor, duplicate_cos: float, chunk: int = 2048, bins: int = 20_000
                      ) -> CoherenceMetrics:
    """Pairwise |cos| of decoder directions (in model space, as steering sees them), exact p95 to 1/bins."""
    unit_FD = F.normalize(W_dec_FD.float(), dim=1)
    n = unit_FD.shape[0]
    hist = torch.zeros(bins, dtype=torch.float64)
    total, maximum, duplicates = 0.0, 0.0, 0
    for start in range(0, n, chunk):
        cos = (unit_FD[start:start + chunk] @ unit_FD.T).abs()
        rows = torch.arange(start, min(start + chunk, n), device=cos.device)
        upper = torch.arange(n, device=cos.device)[None, :] > rows[:, None]  # each unordered pair once
        values = cos[upper]
        hist += torch.histc(values, bins=bins, min=0.0, max=1.0).double().cpu()
        total += float(values.double().sum())
        maximum = max(maximum, float(values.max())) if values.numel() else maximum
        duplicates += int((values > duplicate_cos).sum())
    pairs = n * (n - 1) / 2
    cdf = torch.cumsum(hist, 0) / max(pairs, 1)
    p95 = float((torch.searchsorted(cdf, torch.tensor([0.95], dtype=torch.float64))[0] + 1) / bins)
    return CoherenceMetrics(total / max(pairs, 1), p95, maximum, duplicates)


@torch.no_grad()
def splice_metrics(model: nn.Module, sae: TopKSAE, layer: int, input_ids: torch.Tensor, skip_positions: int,
                   batch: int = 8) -> SpliceMetrics:
    """Next-token CE with the layer's MLP output replaced by its SAE reconstruction (and by zero, for scale).

    Positions before skip_positions keep their clean output: the SAE never trained on them."""
    mode = {"value": "clean"}

    def hook(_module, _inputs, output):
        if mode["value"] == "clean":
            return output
        patched = output.clone()
        tail = output[:, skip_positions:]
        if mode["value"] == "zero":
            patched[:, skip_positions:] = 0
        else:
            flat = tail.reshape(-1, tail.shape[-1]).to(sae.W_enc_DF)  # the SAE's dtype and device
            patched[:, skip_positions:] = sae(flat).reshape(tail.shape).to(output)
        return patched

    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    handle = mlp_module(model, layer).register_forward_hook(hook)
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch):
            ids = input_ids[start:start + batch].to(device)
            logprobs = {}
            for name in ("clean", "spliced", "zero"):
                mode["value"] = name
                logits = model(input_ids=ids, use_cache=False).logits[:, skip_positions:-1].float()
                logprobs[name] = F.log_softmax(logits, -1)
                targets = ids[:, skip_positions + 1:]
                sums[name] += float(-logprobs[name].gather(-1, targets[..., None]).sum())
            sums["kl"] += float((logprobs["clean"].exp() * (logprobs["clean"] - logprobs["spliced"])).sum())
            count += logprobs["clean"].shape[0] * logprobs["clean"].shape[1]
    finally:
        handle.remove()
    ce = {name: sums[name] / count for name in ("clean", "spliced", "zero")}
    denominator = ce["zero"] - ce["clean"]
    recovered = (ce["zero"] - ce["spliced"]) / denominator if abs(denominator) > 1e-9 else float("nan")
    return SpliceMetrics(ce["clean"], ce["spliced"], ce["zero"], sums["kl"] / count, recovered)
