import warnings

import pytest
import torch

from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.config import SAEConfig
from sae_pipeline.sae.metrics import coherence_metrics, reconstruction_metrics
from sae_pipeline.sae.batches import training_batches
from sae_pipeline.sae.model import SAELoadError, TopKSAE, _DenseBF16Decode, _SparseDecode
from sae_pipeline.sae.train import (
    TrainingInterrupted, auxk_loss, k_at, lr_at, merge_near_duplicates, resample_latents, switch_off_latents, train_sae,
    whitening_scale,
)


def sparse_data(n=8192, d=32, n_true=96, active=3, seed=0):
    """Activations made of `active` of `n_true` ground-truth directions each, plus an offset and anisotropy."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_true, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 3 + 0.5
    x = torch.einsum("nk,nkd->nd", coef, dictionary[idx])
    return x * torch.linspace(0.5, 2.0, d) + 5.0


def stats_of(x):
    return WhiteningStats(x.mean(0), x.std(0, unbiased=False), x.shape[0])


# the custom backward passes (CSR products, embedding_bag's per-sample kernel) are checked on every device there is
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

CFG = SAEConfig(n_latents=128, k=4, k_start=8, batch_tokens=256, epochs=6, lr=4e-3, aux_k=16,
                dead_window_tokens=4096, checkpoint_every_steps=20, whiten="diagonal")


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="n_latents must be positive"):
        TopKSAE(8, 0, 1)
    with pytest.raises(ValueError, match="k must be in 1..n_latents=16"):
        TopKSAE(8, 16, 17)


def test_sparse_decode_equals_dense_decode():
    sae = TopKSAE(16, 64, 5)
    sae.init_tied(torch.Generator().manual_seed(0))
    x = torch.randn(10, 16)
    codes = sae.encode(x)
    dense = torch.zeros(10, 64).scatter(1, codes.top_indices, codes.top_acts)
    assert torch.allclose(sae.decode(codes.top_acts, codes.top_indices), dense @ sae.W_dec_FD + sae.b_dec_D,
                          atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_the_decoders_backward_is_the_dense_products_and_bf16_rounds_only_the_forward(device):
    """The decoder's own backward (CSR rows for W_dec, embedding_bag's per-sample kernel for the codes) against
    autograd through the dense product. A GPU's training decode (a bf16 product over the scattered codes) rounds
    its forward alone: the loss is linear, so no gradient reads the forward."""
    g = torch.Generator().manual_seed(5)
    sae = TopKSAE(300, 96, 40)
    sae.init_tied(g)
    sae.to(device)
    indices = torch.stack([torch.randperm(96, generator=g)[:40] for _ in range(20)]).to(device)
    acts, weight = torch.rand(20, 40, generator=g).to(device), torch.randn(20, 300, generator=g).to(device)
    decoders = {"sparse": _SparseDecode, "dense_bf16": _DenseBF16Decode}
    out = {}
    for path in [*decoders, "autograd"]:
        sae.zero_grad()
        leaf = acts.clone().requires_grad_()
        if path == "autograd":
            recon = torch.zeros(20, 96, device=device).scatter(1, indices, leaf) @ sae.W_dec_FD
        else:
            recon = decoders[path].apply(leaf, indices, sae.W_dec_FD)
        (recon * weight).sum().backward()
        out[path] = (recon.detach(), leaf.grad, sae.W_dec_FD.grad.clone())
    for got, want in zip(out["sparse"], out["autograd"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (exact, grad_acts, grad_rows), (rounded, *rounded_grads) = out["sparse"], out["dense_bf16"]
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)  # it did take the bf16 path
    torch.testing.assert_close(rounded, exact, rtol=2e-2, atol=5e-2)  # bf16 rounding of codes and rows
    assert torch.equal(rounded_grads[0], grad_acts) and torch.equal(rounded_grads[1], grad_rows)


@pytest.mark.parametrize("device", DEVICES)
def test_selected_pre_acts_give_the_dense_encoders_gradients(device):
    """The sparse backward (top-k and AuxK entries only) equals autograd through the dense encoder."""
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(24, 96, 4)
    sae.init_tied(g)
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.randn(96, generator=g) * 0.1)
        sae.b_dec_D.copy_(torch.randn(24, generator=g))
    sae.to(device)
    x = torch.randn(64, 24, generator=g).to(device)
    dead_F = torch.zeros(96, dtype=torch.bool, device=device)
    dead_F[::3] = True

    def loss(pick, pre_BF):
        top = pre_BF.detach().topk(4, dim=-1).indices
        recon = sae.decode(torch.relu(pick(top)), top)
        aux_idx = pre_BF.detach().masked_fill(~dead_F, float("-inf")).topk(8, dim=-1).indices
        aux = torch.nn.functional.embedding_bag(aux_idx, sae.W_dec_FD, per_sample_weights=torch.relu(pick(aux_idx)),
                                                mode="sum")
        return (recon - x).pow(2).sum() + (aux - (x - recon).detach()).pow(2).sum()

    grads = []
    for sparse in (False, True):
        sae.zero_grad()
        if sparse:
            with torch.no_grad():
                pre = sae.pre_acts(x)
            loss(lambda idx: sae.selected_pre_acts(x, pre, idx), pre).backward()
        else:
            pre = sae.pre_acts(x)
            loss(lambda idx: pre.gather(1, idx), pre).backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    for dense_grad, sparse_grad in zip(*grads):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-5)
    assert grads[1][0].abs().sum() > 0  # W_enc learns


def test_selected_pre_acts_refuse_inputs_with_a_graph():
    sae = TopKSAE(8, 16, 2)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        pre = sae.pre_acts(x)
    with pytest.raises(ValueError, match="must carry no graph"):
        sae.selected_pre_acts(x, pre, pre.topk(2, dim=-1).indices)


@pytest.mark.parametrize("mode", ["diagonal", "scalar"])
def test_folded_whitening_is_exact(mode):
    x = sparse_data(n=512)
    mean, scale = whitening_scale(stats_of(x), mode)
    sae = TopKSAE(32, 64, 4)
    sae.init_tied(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_dec_D.normal_()
        sae.b_enc_F.normal_()
        white = sae((x - mean) / scale) * scale + mean
        folded = sae.fold_whitening(mean, scale)(x)
    assert torch.allclose(white, folded, atol=1e-4)


def test_k_anneals_from_k_start_to_k():
    cfg = CFG.model_copy(update={"k_anneal_fraction": 0.5})
    ks = [k_at(step, 100, cfg) for step in range(100)]
    assert ks[0] == 8 and ks[50:] == [4] * 50
    assert ks == sorted(ks, reverse=True)


@pytest.mark.parametrize("l1_coeff", [0.0, 3e-3])  # 0: the sparse-gradient encoder path
def test_training_recovers_a_sparse_dictionary(l1_coeff):
    x = sparse_data()
    result = train_sae(x[:7168], stats_of(x[:7168]), CFG.model_copy(update={"l1_coeff": l1_coeff}))
    held = reconstruction_metrics(result.sae, x[7168:])
    assert held.r2 > 0.85, held
    assert result.history[-1]["fvu"] < result.history[0]["fvu"] / 4
    assert held.k_active_p50 <= CFG.k


def test_decoder_rows_stay_unit_norm_during_training():
    x = sparse_data(n=2048)
    cfg = CFG.model_copy(update={"epochs": 1, "whiten": "none"})
    result = train_sae(x, WhiteningStats(torch.zeros(32), torch.ones(32), 2048), cfg)
    assert torch.allclose(result.sae.W_dec_FD.norm(dim=1), torch.ones(128), atol=1e-5)


def test_parallel_gradient_is_removed():
    sae = TopKSAE(8, 16, 2)
    sae.init_tied(torch.Generator().manual_seed(0))
    sae.W_dec_FD.grad = torch.randn(16, 8)
    sae.remove_parallel_decoder_grad()
    assert torch.allclose((sae.W_dec_FD.grad * sae.W_dec_FD).sum(1), torch.zeros(16), atol=1e-6)


@pytest.mark.parametrize("chunk", [512, 4])  # 4: the pairs span row blocks of the cosine matrix
def test_merge_pass_removes_near_duplicates_and_resampling_aims_at_the_residual(chunk):
    sae = TopKSAE(16, 32, 2)
    g = torch.Generator().manual_seed(0)
    sae.init_tied(g)
    with torch.no_grad():
        sae.W_dec_FD[5] = sae.W_dec_FD[3] + 0.05 * torch.randn(16, generator=g)
        sae.W_dec_FD[9] = -sae.W_dec_FD[2]
        sae.normalize_decoder()
    assert coherence_metrics(sae.W_dec_FD, 0.85).near_duplicates == 2
    freed = merge_near_duplicates(sae, 0.85, chunk)
    assert sorted(freed) == [5, 9]
    x_BD = torch.randn(64, 16, generator=g)
    recon_BD = x_BD.clone()
    recon_BD[7], recon_BD[11] = -x_BD[7], 0.0  # the two worst-reconstructed tokens, 7 the worse
    resample_latents(sae, sorted(freed), x_BD, recon_BD, torch.Generator().manual_seed(1), 1.0)
    unit = torch.nn.functional.normalize(x_BD, dim=1)
    assert torch.allclose(sae.W_dec_FD[5], unit[7], atol=1e-6) and torch.allclose(sae.W_dec_FD[9], unit[11], atol=1e-6)
    assert sae.encode(x_BD[7:8], k=32).pre_acts[0, 5] > 0


def test_a_latent_freed_by_the_last_merge_never_fires_and_duplicates_nothing():
    sae = TopKSAE(16, 32, 8)
    g = torch.Generator().manual_seed(4)
    sae.init_tied(g)
    with torch.no_grad():
        sae.W_dec_FD[6] = sae.W_dec_FD[1] + 0.05 * torch.randn(16, generator=g)
        sae.normalize_decoder()
    freed = merge_near_duplicates(sae, 0.85)
    switch_off_latents(sae, freed)
    assert freed == [6] and coherence_metrics(sae.W_dec_FD, 0.85).near_duplicates == 0
    out = sae.encode(torch.randn(256, 16, generator=g), k=32)
    assert (out.top_acts[out.top_indices == 6] == 0).all() and (out.top_acts[out.top_indices == 1] > 0).any()


def test_resampling_more_latents_than_tokens_makes_no_duplicates_and_sets_the_chosen_encoder_norm():
    g = torch.Generator().manual_seed(2)
    sae = TopKSAE(16, 64, 4)
    sae.init_tied(g)
    x_BD = torch.randn(8, 16, generator=g)
    revived = list(range(40))  # five times the batch's tokens
    live_norm = sae.W_enc_DF[:, 40:].norm(dim=0).mean()
    resample_latents(sae, revived, x_BD, torch.zeros_like(x_BD), torch.Generator().manual_seed(3), 0.5)
    worst = x_BD.pow(2).sum(1).argsort(descending=True)
    assert torch.allclose(sae.W_dec_FD[:8], torch.nn.functional.normalize(x_BD[worst], dim=1), atol=1e-6)
    assert coherence_metrics(sae.W_dec_FD[:40], 0.85).near_duplicates == 0
    # resample_encoder_scale: the revived encoders at that multiple of the live latents' mean norm
    assert torch.allclose(sae.W_enc_DF[:, :40].norm(dim=0), 0.5 * live_norm.expand(40), rtol=1e-5)


@pytest.mark.parametrize("aux_k", [3, 10])  # 10: more than the 7 dead latents, so all of them
def test_auxk_is_the_dead_latents_top_k_reconstructing_the_residual(aux_k):
    """The dense sub-SAE over the dead columns against every latent's pre-activation with the live ones masked
    out, decoded through the whole decoder: the same loss and the same gradients."""
    g = torch.Generator().manual_seed(7)
    sae = TopKSAE(24, 64, 4)
    sae.init_tied(g)
    with torch.no_grad():
        sae.b_enc_F.normal_(generator=g)
        sae.b_dec_D.normal_(generator=g)
    x_BD, residual_BD = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
    dead_ids_N = torch.tensor([3, 9, 17, 30, 41, 42, 60])
    aux = auxk_loss(sae, x_BD, residual_BD, dead_ids_N, aux_k, bf16=False)
    aux.backward()
    grads = {name: param.grad.clone() for name, param in sae.named_parameters()}
    sae.zero_grad()
    live_F = torch.ones(64, dtype=torch.bool)
    live_F[dead_ids_N] = False
    chosen = sae.pre_acts(x_BD).masked_fill(live_F, float("-inf")).topk(min(aux_k, 7), dim=-1)
    codes_BF = torch.zeros(16, 64).scatter(1, chosen.indices, torch.relu(chosen.values))
    want = (codes_BF @ sae.W_dec_FD - residual_BD).pow(2).sum() / (residual_BD - residual_BD.mean(0)).pow(2).sum()
    want.backward()
    torch.testing.assert_close(aux, want)
    assert aux > 0 and grads["W_enc_DF"][:, live_F].abs().max() == 0  # live latents get nothing from AuxK
    for name, param in sae.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, msg=name)


def subspace_data():
    """Data in an 8-dim subspace of 32: latents initialised off it never win a top-k slot, so they die."""
    x = sparse_data(n=4096, n_true=512)
    x[:, 8:] = 5.0
    return x


def test_auxk_and_resampling_engage_when_latents_die():
    # Whether revival pays off is measured on real activations (data/evidence); here: both mechanisms switch on,
    # and only when configured.
    x = subspace_data()
    cfg = CFG.model_copy(update={"epochs": 4, "whiten": "none", "dead_window_tokens": 1024})
    bare = train_sae(x, stats_of(x), cfg.model_copy(update={"aux_k": 0, "maintenance_at_fractions": []}))
    revived = train_sae(x, stats_of(x), cfg)
    assert max(row["aux"] for row in bare.history) == 0 and bare.resampled == 0
    assert max(row["aux"] for row in revived.history) > 0 and revived.resampled > 0


# dying latents: AuxK's dead list is refreshed every 4 steps (1,024 / (16 x 16)); latents die after 64 steps and
# the run stops at step 75, between refreshes, so the resumed run must carry the list it had
@pytest.mark.parametrize("dying_latents", [False, True])
def test_interrupted_training_resumes_to_identical_weights(tmp_path, dying_latents):
    x, cfg, stop_after = sparse_data(n=2048), CFG.model_copy(update={"epochs": 3}), 7
    if dying_latents:
        x, cfg, stop_after = subspace_data()[:2048], CFG.model_copy(update={
            "epochs": 1, "batch_tokens": 16, "dead_window_tokens": 1024, "whiten": "none",
            "checkpoint_every_steps": 25, "maintenance_at_fractions": []}), 70
    reference = train_sae(x, stats_of(x), cfg, checkpoint_dir=tmp_path / "ref")
    with pytest.raises(TrainingInterrupted):
        train_sae(x, stats_of(x), cfg, checkpoint_dir=tmp_path / "run", stop_after_steps=stop_after)
    resumed = train_sae(x, stats_of(x), cfg, checkpoint_dir=tmp_path / "run")
    for name, tensor in reference.sae.state_tensors().items():
        assert torch.equal(tensor, resumed.sae.state_tensors()[name]), name
    assert resumed.history == reference.history
    assert (max(row["aux"] for row in reference.history) > 0) == dying_latents  # AuxK ran across the resume


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    sae = TopKSAE(8, 16, 2)
    sae.init_tied(torch.Generator().manual_seed(0))
    sae_hash = sae.save(tmp_path / "sae", {"layer": 3})
    loaded, cfg = TopKSAE.load(tmp_path / "sae")
    assert cfg["sae_hash"] == sae_hash and cfg["layer"] == 3
    assert torch.equal(loaded.W_dec_FD, sae.W_dec_FD)
    weights = tmp_path / "sae" / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SAELoadError, match="does not match cfg.json sae_hash"):
        TopKSAE.load(tmp_path / "sae")
    with pytest.raises(SAELoadError, match="lacks"):
        TopKSAE.load(tmp_path / "missing")


def test_lr_holds_then_decays_linearly_to_zero():
    cfg = CFG.model_copy(update={"lr": 1.0, "lr_decay_fraction": 0.25})
    lrs = [lr_at(step, 100, cfg) for step in range(101)]
    assert lrs[:76] == [1.0] * 76
    assert lrs[100] == 0.0 and abs(lrs[90] - 0.4) < 1e-9


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: runs on the device machine "
                                "(scripts/device_checks.sh)")


@needs_cuda
@pytest.mark.parametrize("l1_coeff", [0.0, 3e-3])
def test_training_and_metrics_on_cuda_match_the_cpu(l1_coeff):
    x = sparse_data()
    cfg = CFG.model_copy(update={"l1_coeff": l1_coeff})
    on_gpu = train_sae(x[:7168], stats_of(x[:7168]), cfg, device="cuda")
    on_cpu = train_sae(x[:7168], stats_of(x[:7168]), cfg)
    assert on_gpu.sae.W_enc_DF.is_cuda
    held_gpu, held_cpu = reconstruction_metrics(on_gpu.sae, x[7168:]), reconstruction_metrics(on_cpu.sae, x[7168:])
    assert held_gpu.r2 > 0.85 and abs(held_gpu.r2 - held_cpu.r2) < 0.05
    assert 0 < coherence_metrics(on_gpu.sae.W_dec_FD, CFG.merge_cos).p95 < 1  # the chunked cosines run there too


def test_batches_follow_one_seeded_permutation_per_epoch_and_resume_mid_epoch():
    x_ND = torch.arange(40.0).reshape(20, 2)  # token i is [2i, 2i + 1]
    cpu = torch.device("cpu")
    full = list(training_batches(x_ND, 4, seed=3, first_step=0, total_steps=12, device=cpu))
    tokens = [(batch_BD[:, 0] / 2).long() for batch_BD in full]
    assert len(full) == 12 and all(batch_BD.shape == (4, 2) for batch_BD in full)
    assert sorted(torch.cat(tokens[:5]).tolist()) == list(range(20)) == sorted(torch.cat(tokens[5:10]).tolist())
    assert not torch.equal(torch.cat(tokens[:5]), torch.cat(tokens[5:10]))  # a new permutation each epoch
    resumed = list(training_batches(x_ND, 4, seed=3, first_step=7, total_steps=12, device=cpu))
    assert len(resumed) == 5 and all(torch.equal(a, b) for a, b in zip(full[7:], resumed))


@needs_cuda
def test_host_data_reaches_cuda_through_pinned_prefetch_unchanged():
    x_ND = sparse_data(n=2048).bfloat16()
    cuda = torch.device("cuda")
    resident = list(training_batches(x_ND.cuda(), 256, seed=0, first_step=2, total_steps=16, device=cuda))
    prefetched = list(training_batches(x_ND, 256, seed=0, first_step=2, total_steps=16, device=cuda))
    assert len(prefetched) == 14 and all(b.is_cuda and torch.equal(a, b) for a, b in zip(resident, prefetched))


@needs_cuda
@pytest.mark.parametrize("host_data", [False, True])
def test_training_steps_on_cuda_wait_for_the_host_only_to_list_dead_latents(host_data):
    # CUDA's sync debug mode names every host sync. A second epoch (128 steps of 16 tokens, latents dead from step
    # 64, AuxK on) may add only its 32 dead-list refreshes (every 1,024 / (16 x 16) steps) and its permutation's
    # copy to the GPU, none per step.
    x = subspace_data()[:2048]
    cfg = CFG.model_copy(update={"whiten": "none", "batch_tokens": 16, "dead_window_tokens": 1024,
                                 "maintenance_at_fractions": []})
    data = x if host_data else x.cuda()

    def syncs(epochs: int) -> tuple[int, float]:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = train_sae(data, stats_of(x), cfg.model_copy(update={"epochs": epochs}), log_every=10 ** 6,
                                   device="cuda")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), result.history[-1]["aux"]

    syncs(1)  # warm-up: CUDA's libraries start up once
    one_epoch, _ = syncs(1)
    two_epochs, aux = syncs(2)
    assert aux > 0 and two_epochs - one_epoch <= 128 // 4 + 1, (one_epoch, two_epochs)
