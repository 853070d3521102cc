"""Top-k SAE training: k anneal, L1 on pre-top-k activations, unit-norm decoder, AuxK, merge pass, resume."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.config import SAEConfig
from sae_pipeline.sae.batches import training_batches
from sae_pipeline.sae.model import TopKSAE

CHECKPOINT_FILE = "checkpoint.pt"


class TrainResult(NamedTuple):
    sae: TopKSAE  # whitening folded in: reads raw activations
    history: list[dict]  # one row per logged step: step, tokens, fvu, l1, aux, k, dead_fraction
    merged: int  # near-duplicate latents merged or freed by the merge passes
    resampled: int  # dead or freed latents re-aimed at poorly reconstructed tokens
    tokens_per_second: float
    wall_seconds: float


def whitening_scale(stats: WhiteningStats, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) per dimension; 'scalar' keeps directions intact and only fixes the overall size."""
    if mode == "none":
        return torch.zeros_like(stats.mean_D), torch.ones_like(stats.std_D)
    if mode == "scalar":
        return stats.mean_D, torch.full_like(stats.std_D, float(stats.std_D.pow(2).mean().sqrt()))
    return stats.mean_D, stats.std_D


def k_at(step: int, total: int, cfg: SAEConfig) -> int:
    """Linear anneal from k_start to k over the first k_anneal_fraction of training."""
    span = cfg.k_anneal_fraction * total
    if span <= 0 or step >= span:
        return cfg.k
    return round(cfg.k_start - (cfg.k_start - cfg.k) * step / span)


def lr_at(step: int, total: int, cfg: SAEConfig) -> float:
    """Constant, then linear decay to zero over the last lr_decay_fraction of training."""
    decay_start = (1 - cfg.lr_decay_fraction) * total
    if step < decay_start:
        return cfg.lr
    return cfg.lr * max(0.0, (total - step) / max(total - decay_start, 1))


def _fvu(x_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
    return (recon_BD - x_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)


def merge_near_duplicates(sae: TopKSAE, threshold: float, chunk: int = 512) -> list[int]:
    """Fold each latent whose decoder |cos| with a kept one exceeds threshold into it; return the freed ids.

    Parallel pairs merge (encoder columns add, the decoder row is the renormalised sum); anti-parallel pairs
    cannot merge additively, so the second is only freed. Freed latents still hold their old weights: resample
    them before training on."""
    with torch.no_grad():
        rows, cols, signs = [], [], []
        for start in range(0, sae.n_latents, chunk):  # row blocks: the F x F cosine matrix is never whole
            cos_CF = sae.W_dec_FD[start:start + chunk] @ sae.W_dec_FD.T
            block = torch.arange(cos_CF.shape[0], device=cos_CF.device)
            cos_CF[block, start + block] = 0
            r, c = torch.nonzero(cos_CF.abs() > threshold, as_tuple=True)
            rows.append(r + start)
            cols.append(c)
            signs.append(cos_CF[r, c] > 0)
        freed: list[int] = []
        taken = torch.zeros(sae.n_latents, dtype=torch.bool)
        for i, j, parallel in zip(torch.cat(rows).tolist(), torch.cat(cols).tolist(), torch.cat(signs).tolist()):
            if i >= j or taken[i] or taken[j]:
                continue
            if parallel:
                sae.W_dec_FD[i] += sae.W_dec_FD[j]
                sae.W_enc_DF[:, i] += sae.W_enc_DF[:, j]
            taken[i] = taken[j] = True
            freed.append(j)
        sae.normalize_decoder()
    return freed


def resample_latents(sae: TopKSAE, latents: list[int], x_BD: torch.Tensor, recon_BD: torch.Tensor,
                     generator: torch.Generator, encoder_scale: float) -> None:
    """Point each latent at the residual of one of the batch's worst-reconstructed tokens (Bricken et al. 2023),
    in the order given; latents beyond the batch's tokens get random unit directions (reusing a residual would make
    exact duplicates: 3,128 near-duplicate pairs at 18,432 latents when they cycled).

    Dead latents whose pre-activations went negative everywhere get no gradient, not even from AuxK; aiming them at
    what the dictionary misses gives them inputs to fire on."""
    if not latents:
        return
    with torch.no_grad():
        residual_BD = x_BD - recon_BD
        worst = residual_BD.pow(2).sum(1).argsort(descending=True)[:len(latents)]
        extra = torch.randn(len(latents) - len(worst), x_BD.shape[1], generator=generator).to(x_BD)
        directions = F.normalize(torch.cat([residual_BD[worst], extra]), dim=1)
        alive = torch.ones(sae.n_latents, dtype=torch.bool, device=x_BD.device)
        alive[latents] = False
        norm = sae.W_enc_DF[:, alive].norm(dim=0).mean() if alive.any() else 1.0
        sae.W_dec_FD[latents] = directions
        sae.W_enc_DF[:, latents] = directions.T * norm * encoder_scale
        sae.b_enc_F[latents] = 0.0


def switch_off_latents(sae: TopKSAE, latents: list[int]) -> None:
    """Leave latents with no encoder and no decoder direction: they never fire (counted dead) and are no one's
    near-duplicate. For latents freed after the last step, which resampling could not train (resampled untrained at
    the end, k 192's dead latents took top-k slots: R2 0.914 -> 0.809, data/evidence/sae_r2_frontier.jsonl)."""
    with torch.no_grad():
        sae.W_enc_DF[:, latents] = 0.0
        sae.b_enc_F[latents] = 0.0
        sae.W_dec_FD[latents] = 0.0


def _reset_adam_rows(optimizer: torch.optim.Optimizer, sae: TopKSAE, latents: list[int]) -> None:
    for param, index in ((sae.W_dec_FD, (latents,)), (sae.W_enc_DF, (slice(None), latents)), (sae.b_enc_F, (latents,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0


def _chosen(sae: TopKSAE, x_BD: torch.Tensor, pre_BF: torch.Tensor, indices_BS: torch.Tensor,
            sparse_grad: bool) -> torch.Tensor:
    """The pre-activations at the chosen latents, differentiable through the sparse or the dense encoder graph."""
    if sparse_grad:
        return sae.selected_pre_acts(x_BD, pre_BF, indices_BS)
    return pre_BF.gather(1, indices_BS).to(sae.W_enc_DF.dtype)


def auxk_loss(sae: TopKSAE, x_BD: torch.Tensor, residual_BD: torch.Tensor, dead_ids_N: torch.Tensor, aux_k: int,
              bf16: bool) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the aux_k dead latents with the largest pre-activations reconstruct what the live
    ones missed (FVU of the residual), which pulls them back to life.

    A dense sub-SAE over the N dead columns alone: three (B, D) x (D, N)-sized products, whatever aux_k. The top-k's
    per-entry sparse products would grow with B x aux_k x D instead, and AuxK's choice is wide (2,048 per token at
    d 4,096, 64 times the top-k's 32)."""
    with torch.autocast(device_type=x_BD.device.type, dtype=torch.bfloat16, enabled=bf16):
        pre_BN = torch.addmm(sae.b_enc_F[dead_ids_N], x_BD - sae.b_dec_D, sae.W_enc_DF[:, dead_ids_N])
        chosen = pre_BN.topk(min(aux_k, len(dead_ids_N)), dim=-1, sorted=False)
        codes_BN = torch.zeros_like(pre_BN).scatter(1, chosen.indices, F.relu(chosen.values))
        recon_BD = codes_BN @ sae.W_dec_FD[dead_ids_N]
    return _fvu(residual_BD, recon_BD.float())


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train_sae(train_ND: torch.Tensor, stats: WhiteningStats, cfg: SAEConfig, checkpoint_dir: Path | None = None,
              stop_after_steps: int | None = None, log_every: int = 10,
              on_log: Callable[[dict], None] | None = None, device: str | torch.device | None = None) -> TrainResult:
    """Train on (N, D) raw activations. With checkpoint_dir, resumes a matching interrupted run.

    The SAE trains on `device` (default: where train_ND lives); batches move there one at a time, so the
    activations may stay in host memory. The returned SAE sits on that device.
    stop_after_steps ends this call early (as an interruption would) after a checkpoint; the next call resumes.
    """
    device = torch.device(device) if device is not None else train_ND.device
    n_tokens, d_model = train_ND.shape
    if n_tokens < cfg.batch_tokens:
        raise ValueError(f"{n_tokens} training tokens are fewer than one batch of {cfg.batch_tokens}")
    mean_D, scale_D = (t.to(device) for t in whitening_scale(stats, cfg.whiten))
    steps_per_epoch = n_tokens // cfg.batch_tokens
    total_steps = max(1, math.floor(cfg.epochs * steps_per_epoch))
    maintenance_steps = {round(fraction * total_steps) for fraction in cfg.maintenance_at_fractions}
    torch.manual_seed(cfg.seed)
    # Made and drawn where it trains: at d 4,096 x 16,384 a CPU start takes 0.9 s on 2 cores, plus a 512 MB copy,
    # as long as ~50 of an H200's steps
    with device:
        sae = TopKSAE(d_model, cfg.n_latents, cfg.k)
    sae.init_tied(torch.Generator(device).manual_seed(cfg.seed))
    with torch.no_grad():  # start the decoder bias at the data mean, so no latent wins just by aligning with it
        sae.b_dec_D.copy_((stats.mean_D.to(device) - mean_D) / scale_D)
    optimizer = torch.optim.AdamW(
        [{"params": [sae.W_enc_DF], "weight_decay": cfg.encoder_weight_decay},
         {"params": [sae.b_enc_F, sae.W_dec_FD, sae.b_dec_D], "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=True)  # one kernel per parameter: ~2x less optimizer time on a CPU
    tokens_since_fired_F = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
    # AuxK's latents change on the scale of the dead window: listing them (a nonzero, which makes a GPU wait for the
    # host) at a sixteenth of it, not every step, leaves a step with no host sync. None: list them at the next step.
    dead_refresh_steps = max(1, cfg.dead_window_tokens // (16 * cfg.batch_tokens))
    dead_ids_N: torch.Tensor | None = None
    history: list[dict] = []
    step, merged, resampled = 0, 0, 0
    checkpoint = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    fingerprint = {"cfg": cfg.model_dump(mode="json"), "shape": [n_tokens, d_model]}
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        if state["fingerprint"] == fingerprint:
            sae.load_state_dict(state["sae"])
            optimizer.load_state_dict(state["optimizer"])
            for group in optimizer.param_groups:  # a checkpoint from before the fused optimizer would switch it off
                group["fused"] = True
            tokens_since_fired_F, history, step, merged, resampled = (
                state["tokens_since_fired"], state["history"], state["step"], state["merged"], state["resampled"])
            dead_ids_N = state.get("dead_ids")
    began, start_step = time.perf_counter(), step
    bar = tqdm(total=total_steps, initial=step, desc=f"train SAE F={cfg.n_latents} k={cfg.k}", unit="step")
    batches = training_batches(train_ND, cfg.batch_tokens, cfg.seed, step, total_steps, device)
    # Without L1 the reconstruction reads only the top-k latents, so its gradient is sparse: the dense encoder pass
    # runs without a graph and only the chosen entries are differentiated (AuxK builds its own small graph). L1 on
    # every pre-activation needs the dense graph.
    sparse_grad = cfg.l1_coeff == 0
    dense_decode = cfg.bf16_autocast and device.type == "cuda"  # model.py's _DenseBF16Decode: a GPU's faster path
    while step < total_steps:
        x_BD = (next(batches).float() - mean_D) / scale_D
        k = k_at(step, total_steps, cfg)
        # The encoder matmul is the largest cost; bf16 runs it ~4x faster on AVX512-BF16 CPUs and on GPUs,
        # while master weights, decoder, loss and optimizer stay fp32. pre_BF stays bf16 (top-k reads it as is):
        # an fp32 copy of (B, F) would cost more than it keeps, the product having been rounded to bf16 already.
        with torch.set_grad_enabled(not sparse_grad), torch.autocast(
                device_type=x_BD.device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            pre_BF = sae.pre_acts(x_BD)
        top_indices_BK = pre_BF.detach().topk(k, dim=-1, sorted=False).indices
        top_acts_BK = F.relu(_chosen(sae, x_BD, pre_BF, top_indices_BK, sparse_grad))
        recon_BD = sae.decode(top_acts_BK, top_indices_BK, dense_decode)
        fvu = _fvu(x_BD, recon_BD)
        logged = (step + 1) % log_every == 0 or step + 1 == total_steps
        # L1 on pre-top-k activations, divided by the same total variance as the L2 term, so lambda keeps its
        # meaning in "sum of squared errors + lambda * sum of |pre|" per token, whatever the activation scale.
        # Without L1 it is only logged: a pass over (B, F) on logged steps alone.
        l1 = fvu.new_zeros(())
        if cfg.l1_coeff or logged:
            l1 = F.relu(pre_BF).sum(dtype=torch.float32) / (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = fvu + cfg.l1_coeff * l1
        dead_F = tokens_since_fired_F >= cfg.dead_window_tokens
        if dead_ids_N is None or step % dead_refresh_steps == 0:
            dead_ids_N = torch.nonzero(dead_F).flatten()
        aux = fvu.new_zeros(())
        if cfg.aux_k and len(dead_ids_N):
            aux = auxk_loss(sae, x_BD, (x_BD - recon_BD).detach(), dead_ids_N, cfg.aux_k, cfg.bf16_autocast)
            loss = loss + cfg.aux_coeff * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()
        # counted with index_add, not a boolean mask: a mask's nonzero would make a GPU wait for the CPU every step
        fired_count_F = torch.zeros(cfg.n_latents, dtype=torch.int32, device=device).index_add_(
            0, top_indices_BK.flatten(), (top_acts_BK > 0).flatten().int())
        tokens_since_fired_F = torch.where(fired_count_F > 0, 0, tokens_since_fired_F + x_BD.shape[0])
        step += 1
        if step in maintenance_steps:
            freed = merge_near_duplicates(sae, cfg.merge_cos)
            # freed latents first: they still hold a kept latent's direction, so each needs a residual of its own
            revived = freed + sorted(set(torch.nonzero(dead_F).flatten().tolist()) - set(freed))
            resample_latents(sae, revived, x_BD, recon_BD.detach(),
                             torch.Generator().manual_seed(cfg.seed * 1000 + step), cfg.resample_encoder_scale)
            _reset_adam_rows(optimizer, sae, revived)
            tokens_since_fired_F[revived] = 0
            dead_ids_N = None
            merged += len(freed)
            resampled += len(revived)
        if logged:
            fvu_value, l1_value, aux_value, dead_fraction = torch.stack(  # one host sync for the row, not four
                [fvu.detach(), l1.detach().float(), aux.detach().float(), dead_F.float().mean()]).tolist()
            row = {"step": step, "tokens": step * cfg.batch_tokens, "fvu": fvu_value, "l1": l1_value,
                   "aux": aux_value, "k": k, "dead_fraction": dead_fraction}
            history.append(row)
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.3f}")
            if on_log:
                on_log(row)
        bar.update(1)
        if checkpoint is not None and (step % cfg.checkpoint_every_steps == 0 or step == total_steps):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(checkpoint, {
                "fingerprint": fingerprint, "sae": sae.state_dict(), "optimizer": optimizer.state_dict(),
                "tokens_since_fired": tokens_since_fired_F, "dead_ids": dead_ids_N, "history": history, "step": step,
                "merged": merged, "resampled": resampled})
            if stop_after_steps is not None and step - start_step >= stop_after_steps and step < total_steps:
                bar.close()
                batches.close()
                raise TrainingInterrupted(step)
    bar.close()
    batches.close()
    # the merge pass once more: pairs can form after the last maintenance, and the gate counts them on what is saved
    freed = merge_near_duplicates(sae, cfg.merge_cos)
    switch_off_latents(sae, freed)
    merged += len(freed)
    wall = time.perf_counter() - began
    tokens_per_second = (step - start_step) * cfg.batch_tokens / wall if wall > 0 else 0.0
    return TrainResult(sae.fold_whitening(mean_D, scale_D).eval(), history, merged, resampled, tokens_per_second,
                       wall)


class TrainingInterrupted(RuntimeError):
    """Raised by stop_after_steps after a checkpoint: the state is saved and a later call resumes."""

    def __init__(self, step: int):
        super().__init__(f"training stopped after step {step}; the checkpoint holds the state to resume from")
        self.step = step
