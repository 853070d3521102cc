"""Steering hooks' decode steps replayed as CUDA graphs (steering/cuda_graphs.py) give the eager kernels' logits,
request after request. Needs CUDA: runs on the device machine (scripts/device_checks.sh, which skips the conftest)."""

from dataclasses import replace

import pytest
import torch

from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.fused.net import FusedNet
from sae_pipeline.fused.release import fused_layers
from sae_pipeline.steering.runtime import CategoryRouter, FeatureGroups, LayerSteering, ProbeGate, patched
from sae_pipeline.steering.sidecar import DenseSidecar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: runs on the device machine "
                                "(scripts/device_checks.sh)")
D, VOCAB, READ, STEER = 64, 256, 1, 2
SIZES = {"chem": 2, "bio": 2}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def _decode_logits(model, layers, requests, cuda_graphs: bool):
    """Each request (input ids, mode: "inference", "no_grad" or "reverse", the last under inference mode) as a
    prefill and four teacher-forced decode steps through one patch: (B, 5, vocab) per request, and how many graphs
    the hooks captured."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(1)
    out = []
    with patched(model, layers, 1, cuda_graphs) as patch:
        for ids_BS, mode in requests:
            forced_BT = torch.randint(0, VOCAB, (ids_BS.shape[0], 4), generator=generator).cuda()
            grad_off = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
            with grad_off, patch.reverse_if(mode == "reverse"):
                cache = DynamicCache()
                logits = [model(input_ids=ids_BS, past_key_values=cache, use_cache=True).logits[:, -1]]
                for step in range(forced_BT.shape[1]):
                    logits.append(model(input_ids=forced_BT[:, step:step + 1], past_key_values=cache,
                                        use_cache=True).logits[:, -1])
            out.append(torch.stack(logits, 1).float())
        captured = sum(len(state.graphs.captured) for state in patch.layers.values())
    return out, captured


def _gate_firing_on_first(model, prompts_BS) -> ProbeGate:
    """A probe that fires on row 0's prompt and not on row 1's (their summaries' difference, cut at the midpoint)."""
    probe = {STEER: LayerSteering(None, 0.0, refusal_D=torch.zeros(D), beta=1.0,
                                  gate=ProbeGate(torch.zeros(2 * D), 0.0, (READ,)))}
    with torch.inference_mode(), patched(model, probe) as patch:
        model(input_ids=prompts_BS)
        summary = patch.prompt_summaries[READ].float().cpu()
    weight = summary[0] - summary[1]
    return ProbeGate(weight, float(-(summary[0] + summary[1]) @ weight / 2), (READ,))


def _configs(model, prompts_BS) -> dict:
    generator = torch.Generator().manual_seed(2)
    directions = torch.nn.functional.normalize(torch.randn(4, D, generator=generator), dim=-1)
    sidecar = DenseSidecar(directions, directions.clone(), torch.full((4,), -0.05))
    refusal_D = 4 * torch.randn(D, generator=generator)
    gate = _gate_firing_on_first(model, prompts_BS)
    single = LayerSteering(sidecar, alpha=0.6, beta=1.0, refusal_D=refusal_D, gate=gate)
    router = CategoryRouter(tuple(SIZES), torch.randn(2 * D, 2, generator=generator), torch.zeros(2), (READ,))
    grouped = replace(single, alpha=1.0, groups=FeatureGroups.of(SIZES, {"chem": 0.6, "bio": 0.3}), router=router,
                      route_scale_C=torch.tensor([0.8, 1.0]))
    net = FusedNet.from_sidecar(sidecar, SIZES, WhiteningStats(torch.zeros(D), torch.ones(D), 1)).to("cuda")
    return {"single basis": {STEER: single}, "grouped, routed": {STEER: grouped},
            "fused torch net": fused_layers({STEER: grouped}, {STEER: net})}


@pytest.mark.parametrize("name", ["single basis", "grouped, routed", "fused torch net"])
def test_cuda_graphed_decode_steps_match_the_eager_hooks_request_after_request(name, monkeypatch):
    monkeypatch.setenv("STEER_DEBUG", "1")  # one request runs reverse-safety: another captured mode
    model = _tiny_llama()
    a_S, b_S = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3)).cuda()
    ab, ba = torch.stack([a_S, b_S]), torch.stack([b_S, a_S])
    layers = _configs(model, ab)[name]
    # the second request fires the other row: a graph still adding the first request's refusal would differ; then
    # reverse, a no-grad call (its own buffers) and a batch of one (its own shapes)
    requests = [(ab, "inference"), (ba, "inference"), (ab, "reverse"), (ba, "no_grad"), (a_S[None], "inference")]
    fired_rows = [0, 1, 0, 1, 0]
    eager, none_captured = _decode_logits(model, layers, requests, cuda_graphs=False)
    graphed, captured = _decode_logits(model, layers, requests, cuda_graphs=True)
    unsteered, _ = _decode_logits(model, {}, [(ids, "inference") for ids, _ in requests], cuda_graphs=True)
    assert none_captured == 0 and captured == 4  # forward, reverse, no-grad, batch of one
    for request, (want, got, plain) in enumerate(zip(eager, graphed, unsteered)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3, msg=f"{name}, request {request}")
        # the refusal really goes in at decode on the fired row
        assert (want[fired_rows[request], 1:] - plain[fired_rows[request], 1:]).abs().amax() > 0.5, (name, request)
