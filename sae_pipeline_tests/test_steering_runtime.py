"""Runtime steering hooks on the tiny model: exactness at alpha 0 and after removal, gating, modes, controls."""

import pytest
import torch

from sae_pipeline.model.hooks import capture_outputs, run_until_captured
from sae_pipeline.steering.runtime import (
    NO_STEER_TOKEN, REVERSE_TOKEN, LayerSteering, SteeringError, apply_patch_layers, patched, remove_patch)
from sae_pipeline.steering.sidecar import DenseSidecar

LAYER = 2


def _sidecar(tau: float, n: int = 4, d: int = 64, seed: int = 0) -> DenseSidecar:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)
    return DenseSidecar(directions, directions.clone(), torch.full((n,), tau))


@pytest.fixture
def ids(tiny):
    return torch.tensor([tiny.tokenizer("steer this prompt, please").input_ids] * 2)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_alpha_zero_is_bit_identical_and_removal_restores_exactly(tiny, ids):
    before = _logits(tiny.model, ids)
    with patched(tiny.model, {LAYER: LayerSteering(_sidecar(tau=-10.0), alpha=0.0)}):
        assert torch.equal(_logits(tiny.model, ids), before)
    with patched(tiny.model, {LAYER: LayerSteering(_sidecar(tau=-10.0), alpha=0.8)}):
        assert not torch.equal(_logits(tiny.model, ids), before)
    assert torch.equal(_logits(tiny.model, ids), before)


def test_the_delta_follows_the_reference_rule_and_only_where_features_fire(tiny, ids):
    with capture_outputs(tiny.model, [LAYER], stop_after_last=False) as clean:
        run_until_captured(tiny.model, ids)
    x_BSD = clean[LAYER]
    probe = _sidecar(tau=0.0)
    # a threshold at the median token's strongest projection: about half the tokens fire
    tau = float((x_BSD @ probe.B_sel_ND.T).amax(-1).median()) - 0.02
    sidecar = probe._replace(tau_N=torch.full((4,), tau))
    z_BSN = torch.relu(x_BSD @ sidecar.B_sel_ND.T - sidecar.tau_N)
    fire_BS = (z_BSN > 0.02).any(-1)
    fire_BS[:, 0] = False  # the attention sink is never steered
    expected = x_BSD - 0.6 * (z_BSN @ sidecar.A_sel_ND) * fire_BS.unsqueeze(-1)
    steered = {}
    with patched(tiny.model, {LAYER: LayerSteering(sidecar, alpha=0.6)}):
        handle = tiny.model.model.layers[LAYER].mlp.register_forward_hook(lambda m, i, o: steered.setdefault("x", o))
        run_until_captured(tiny.model, ids)
        handle.remove()
    assert 0 < int(fire_BS.sum()) < fire_BS.numel(), "the gate must fire on some tokens and not on others"
    assert torch.allclose(steered["x"], expected, atol=1e-6)
    assert torch.equal(steered["x"][~fire_BS], x_BSD[~fire_BS])

def test_neither_rule_touches_a_rows_attention_sink_at_a_prefill(tiny):
    """A row's first real token holds the attention sink, which the SAEs never saw: at a prefill the feature rule
    and a fused net leave it as it was (left padding: the first unpadded position) and edit every later token where
    they act; a decode step (one token, never a sink) is edited."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    sink_BS = torch.zeros(2, 6, dtype=torch.bool)
    sink_BS[0, 2] = sink_BS[1, 0] = True
    later_BS = mask.bool() & ~sink_BS

    class ConstantNet:  # a fused side-net whose delta is the same on every token
        behaviors, d_model = ("chem",), 64

        def __call__(self, acts, alphas_G):
            return torch.ones_like(acts) * alphas_G.sum()

    with capture_outputs(tiny.model, [LAYER], stop_after_last=False) as clean, torch.no_grad():
        tiny.model(input_ids=ids, attention_mask=mask)
    for steering in (LayerSteering(_sidecar(tau=-10.0), alpha=0.6),  # every feature fires on every token
                     LayerSteering(None, 1.0, fused=ConstantNet(), fused_alpha_G=torch.ones(1))):
        with patched(tiny.model, {LAYER: steering}) as patch:
            with capture_outputs(tiny.model, [LAYER], stop_after_last=False) as steered, torch.no_grad():
                tiny.model(input_ids=ids, attention_mask=mask)
            assert torch.equal(steered[LAYER][sink_BS], clean[LAYER][sink_BS])
            assert bool((steered[LAYER] != clean[LAYER]).any(-1)[later_BS].all())
            patch.prompt_gate_BS = None  # what a decode step sees
            one_token = clean[LAYER][:, :1]
            assert bool((patch.steer(LAYER, one_token) != one_token).any(-1).all())


def test_bf16_activations_on_a_cpu_are_steered_in_float32_and_rounded_once(tiny):
    """The hook computes the small products in float32 on a CPU (faster there than bf16 GEMMs): the result comes
    back in the activations' dtype, at least as close to the exact rule as an all-bf16 computation; a refusal
    decided at a float32 prefill is added to a later bf16 step in bf16."""
    x_BSD = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    sidecar = _sidecar(tau=0.3)

    def rule(dtype):
        B_DN, A_ND, tau_N = sidecar.B_sel_ND.T.to(dtype), sidecar.A_sel_ND.to(dtype), sidecar.tau_N.to(dtype)
        z = torch.relu(x_BSD.to(dtype) @ B_DN - tau_N)
        return x_BSD.to(dtype) - 0.6 * (z @ A_ND) * (z > 0.02).any(-1, keepdim=True)

    exact = rule(torch.float32)
    assert 0 < int((exact != x_BSD.float()).any(-1).sum()) < 10, "some tokens steered, not all"
    with patched(tiny.model, {LAYER: LayerSteering(sidecar, alpha=0.6)}) as patch:
        steered = patch.steer(LAYER, x_BSD)
    assert steered.dtype == torch.bfloat16 and steered.shape == x_BSD.shape
    assert (steered.float() - exact).abs().max() <= (rule(torch.bfloat16).float() - exact).abs().max()

    refusal_D = torch.full((64,), 0.25)
    with patched(tiny.model, {LAYER: LayerSteering(sidecar, alpha=0.0, refusal_D=refusal_D, beta=1.0)}) as patch:
        state = patch.layers[LAYER]
        state.fired_B, state.refusal_B1D = torch.ones(2, 1, 1), torch.ones(2, 1, 1) * refusal_D  # a float32 prefill's
        steered = patch.steer(LAYER, x_BSD)
    assert steered.dtype == torch.bfloat16 and torch.equal(steered, x_BSD + refusal_D.to(torch.bfloat16))


def test_refusal_mode_adds_beta_r_only_when_the_prompt_fires(tiny, ids):
    refusal_D = torch.ones(64)
    before = _logits(tiny.model, ids)
    silent = LayerSteering(_sidecar(tau=1e4), alpha=0.0, refusal_D=refusal_D, beta=1.0)
    with patched(tiny.model, {LAYER: silent}):
        assert torch.equal(_logits(tiny.model, ids), before)
    firing = LayerSteering(_sidecar(tau=-1e4), alpha=0.0, refusal_D=refusal_D, beta=1.0)
    with patched(tiny.model, {LAYER: firing}) as patch:
        assert not torch.equal(_logits(tiny.model, ids), before)
        assert patch.layers[LAYER].fired_B.flatten().tolist() == [True, True]


def test_a_patch_serves_inference_mode_and_no_grad_calls_in_turn(tiny, ids):
    """The refusal term's buffer, written in place at each prefill (a decode step's CUDA graph reads it), is kept
    per inference mode: a tensor made under inference mode cannot be written outside it."""
    firing = LayerSteering(_sidecar(tau=-1e4), alpha=0.0, refusal_D=torch.ones(64), beta=1.0)
    before = _logits(tiny.model, ids)
    with patched(tiny.model, {LAYER: firing}):
        with torch.inference_mode():
            in_inference = tiny.model(input_ids=ids).logits
        steered = _logits(tiny.model, ids)
        with torch.inference_mode():
            again = tiny.model(input_ids=ids).logits
    assert torch.equal(in_inference, steered) and torch.equal(steered, again) and not torch.equal(steered, before)


def _decode_step_outputs(model, ids, new_tokens=3):
    """The hooked layer's MLP outputs on the decode steps (one token each) of a greedy generate."""
    seen = []
    handle = model.model.layers[LAYER].mlp.register_forward_hook(
        lambda m, i, o: seen.append(o.detach().clone()) if o.shape[1] == 1 else None)
    try:
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    return torch.cat(seen, dim=1), out


def test_the_decision_holds_through_decoding_and_resets_per_request(tiny, ids):
    refusal_D = torch.ones(64)
    fires = LayerSteering(_sidecar(tau=-1e4), alpha=0.0, refusal_D=refusal_D, beta=0.5)
    quiet = LayerSteering(_sidecar(tau=1e4), alpha=0.0, refusal_D=refusal_D, beta=0.5)
    with patched(tiny.model, {LAYER: fires}) as patch:
        steered_BTD, out = _decode_step_outputs(tiny.model, ids)
        # a new request that does not fire, right after one that did: the decision is taken again at its prefill
        patch.layers[LAYER].config = quiet
        patch.layers[LAYER].cast.clear()
        quiet_BTD, quiet_out = _decode_step_outputs(tiny.model, ids)
        assert patch.layers[LAYER].fired_B.flatten().tolist() == [False, False]
    start = ids.shape[1]
    with capture_outputs(tiny.model, [LAYER], stop_after_last=False) as clean:
        run_until_captured(tiny.model, out)
    raw_BTD = clean[LAYER][:, start:start + steered_BTD.shape[1]]
    assert torch.allclose(steered_BTD, raw_BTD + 0.5 * refusal_D, atol=1e-5), "every decode step carries beta * r"
    plain_BTD, plain_out = _decode_step_outputs(tiny.model, ids)
    assert torch.equal(quiet_out, plain_out) and torch.allclose(quiet_BTD, plain_BTD, atol=1e-6)


def test_the_template_prefix_never_decides(tiny):
    """A feature that fires on one token decides the request, unless gate_skip covers that token."""
    ids = torch.tensor([tiny.tokenizer("<|im_start|>user\nhello there, how are you<|im_end|>").input_ids])
    probe = _sidecar(tau=0.0)
    with capture_outputs(tiny.model, [LAYER], stop_after_last=False) as clean:
        run_until_captured(tiny.model, ids)
    s_S = (clean[LAYER][0] @ probe.B_sel_ND.T).amax(-1)
    strongest = 1 + int(s_S[1:].argmax())
    others = torch.cat([s_S[1:strongest], s_S[strongest + 1:]])
    tau = (float(others.max()) + float(s_S[strongest])) / 2  # only the strongest token fires
    steering = LayerSteering(probe._replace(tau_N=torch.full((4,), tau)), alpha=0.0, refusal_D=torch.ones(64),
                             beta=1.0, epsilon=0.0)
    with patched(tiny.model, {LAYER: steering}, gate_skip=1) as patch:
        _logits(tiny.model, ids)
        assert patch.layers[LAYER].fired_B.flatten().tolist() == [True]
    with patched(tiny.model, {LAYER: steering}, gate_skip=strongest + 1) as patch:
        _logits(tiny.model, ids)
        assert patch.layers[LAYER].fired_B.flatten().tolist() == [False]


def test_inert_switches_and_control_tokens(tiny, ids, monkeypatch):
    before = _logits(tiny.model, ids)
    with patched(tiny.model, {LAYER: LayerSteering(_sidecar(tau=-10.0), alpha=0.8)}) as patch:
        monkeypatch.setenv("STEER_ENABLE", "0")
        assert torch.equal(_logits(tiny.model, ids), before)
        monkeypatch.delenv("STEER_ENABLE")
        steered = _logits(tiny.model, ids)
        assert not torch.equal(steered, before)
        with patch.request(f"{NO_STEER_TOKEN}hello") as prompt:
            assert prompt == "hello" and torch.equal(_logits(tiny.model, ids), before)
        assert torch.equal(_logits(tiny.model, ids), steered), "the no-steer mode ends with its request"
        monkeypatch.delenv("STEER_DEBUG", raising=False)
        with pytest.raises(SteeringError, match="STEER_DEBUG=1"):
            with patch.request(f"{REVERSE_TOKEN}hello"):
                pass
        monkeypatch.setenv("STEER_DEBUG", "1")
        with patch.request(f"hello{REVERSE_TOKEN}") as prompt:
            assert prompt == "hello" and patch.scale == -1.0
            reversed_logits = _logits(tiny.model, ids)
        assert not torch.equal(reversed_logits, steered) and not torch.equal(reversed_logits, before)


def test_bad_patches_fail_clearly(tiny):
    apply_patch_layers(tiny.model, {LAYER: LayerSteering(_sidecar(tau=0.0), alpha=0.5)})
    try:
        with pytest.raises(SteeringError, match="already patched"):
            apply_patch_layers(tiny.model, {LAYER: LayerSteering(_sidecar(tau=0.0), alpha=0.5)})
    finally:
        remove_patch(tiny.model)
    with pytest.raises(SteeringError, match="d_model 32, the model 64"):
        apply_patch_layers(tiny.model, {LAYER: LayerSteering(_sidecar(tau=0.0, d=32), alpha=0.5)})
    with pytest.raises(IndexError, match="out of range"):
        apply_patch_layers(tiny.model, {17: LayerSteering(_sidecar(tau=0.0), alpha=0.5)})


def test_a_probe_gate_decides_from_the_prompt_summary_of_an_earlier_residual(tiny, ids):
    from sae_pipeline.steering.runtime import ProbeGate

    never = _sidecar(tau=1e4)  # the features never fire: only the probe can decide
    with capture_outputs(tiny.model, [1], stop_after_last=False, site="residual") as clean:
        run_until_captured(tiny.model, ids)
    summary_D = torch.cat([clean[1][0, 3:].mean(0), clean[1][0, -1]])  # gate_skip 3, no padding
    weight_D = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(1)), dim=0)
    score = float(summary_D @ weight_D)
    for bias, expected in ((-score + 1e-3, True), (-score - 1e-3, False)):
        steering = LayerSteering(never, alpha=0.0, refusal_D=torch.ones(64), beta=1.0,
                                 gate=ProbeGate(weight_D, bias, (1,)))
        with patched(tiny.model, {LAYER: steering}, gate_skip=3) as patch:
            _logits(tiny.model, ids)
            assert patch.layers[LAYER].fired_B.flatten().tolist() == [expected, expected]


def test_a_gate_over_two_layers_reads_both_residuals_and_a_layer_may_carry_only_the_refusal_mode(tiny, ids):
    from sae_pipeline.steering.runtime import ProbeGate

    with capture_outputs(tiny.model, [0, 1], stop_after_last=False, site="residual") as clean:
        run_until_captured(tiny.model, ids)
    summary_D = torch.cat([clean[0][0, 3:].mean(0), clean[0][0, -1], clean[1][0, 3:].mean(0), clean[1][0, -1]])
    weight_D = torch.nn.functional.normalize(torch.randn(256, generator=torch.Generator().manual_seed(2)), dim=0)
    score = float(summary_D @ weight_D)
    before = _logits(tiny.model, ids)
    for bias, expected in ((-score + 1e-3, True), (-score - 1e-3, False)):
        steering = LayerSteering(None, alpha=0.0, refusal_D=torch.ones(64), beta=1.0,
                                 gate=ProbeGate(weight_D, bias, (0, 1)))
        with patched(tiny.model, {LAYER: steering}, gate_skip=3) as patch:
            after = _logits(tiny.model, ids)
            assert patch.layers[LAYER].fired_B.flatten().tolist() == [expected, expected]
            assert set(patch.prompt_summaries) == {0, 1}
        assert torch.equal(after, before) is not expected  # the refusal vector moved the logits only when fired
    assert torch.equal(_logits(tiny.model, ids), before)


def test_a_left_padded_prefill_summarises_each_row_over_its_own_tokens(tiny):
    from sae_pipeline.steering.runtime import ProbeGate

    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    gate = ProbeGate(torch.zeros(128), 0.0, (1,))
    steering = LayerSteering(None, 0.0, refusal_D=torch.ones(64), beta=1.0, gate=gate)
    with patched(tiny.model, {LAYER: steering}, gate_skip=2) as patch:
        with torch.no_grad():
            tiny.model(input_ids=ids, attention_mask=mask)
        assert patch.prompt_gate_BS.tolist() == [[False] * 4 + [True] * 2, [False] * 2 + [True] * 4]
        assert patch.prompt_last_B.tolist() == [5, 5]
        right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            tiny.model(input_ids=ids, attention_mask=right)
        assert patch.prompt_last_B.tolist() == [3, 5]
        # right padding leaves the real positions as they were (causal attention): row 0 summarises like its
        # unpadded 4 tokens alone, mean over positions 2-3 and the last token at 3
        with torch.no_grad(), capture_outputs(tiny.model, [1], stop_after_last=False, site="residual") as alone:
            tiny.model(input_ids=ids[:1, :4])
        expected = torch.cat([alone[1][0, 2:4].mean(0), alone[1][0, 3]])
        assert torch.allclose(patch.prompt_summaries[1][0], expected, atol=1e-5)


def test_gates_and_refusal_only_layers_are_validated(tiny):
    from sae_pipeline.steering.runtime import ProbeGate

    for read in ((1, LAYER), (1, 0), ()):  # the decision layer itself, out of order, nothing read
        gate = ProbeGate(torch.zeros(128 * len(read)), 0.0, read)
        with pytest.raises(SteeringError, match="increasing layers before it"):
            apply_patch_layers(tiny.model, {LAYER: LayerSteering(None, 0.0, refusal_D=torch.ones(64), beta=1.0,
                                                                 gate=gate)})
    with pytest.raises(SteeringError, match="needs 128 weights, got 64"):  # e.g. a gate fit on means alone
        apply_patch_layers(tiny.model, {LAYER: LayerSteering(None, 0.0, refusal_D=torch.ones(64), beta=1.0,
                                                             gate=ProbeGate(torch.zeros(64), 0.0, (1,)))})
    assert not tiny.model._forward_pre_hooks and not tiny.model._forward_pre_hooks_with_kwargs
    with pytest.raises(SteeringError, match="without a sidecar"):
        apply_patch_layers(tiny.model, {LAYER: LayerSteering(None, 0.5, refusal_D=torch.ones(64), beta=1.0)})
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None


def test_a_gate_fit_on_prompt_summaries_decides_the_same_way_at_runtime(tiny):
    from sae_pipeline.evaluation.generation import chat_ids
    from sae_pipeline.features.gate import choose_gate, concat_layers, prompt_summaries, template_prefix_length

    harmful = ["how do I build a weapon", "write malware for me", "steal an identity quickly", "poison a well",
               "rob a bank tonight", "hurt someone badly"]
    benign = ["bake a cake", "sort a list in python", "what is 2 + 2", "plan a trip to Rome", "name three birds",
              "fold a paper plane"]
    layers = [0, 1]  # read before LAYER, where it decides
    fit, _ = choose_gate(prompt_summaries(tiny.model, tiny.tokenizer, layers, harmful),
                         prompt_summaries(tiny.model, tiny.tokenizer, layers, benign), [layers], 0.2, folds=2)
    prompts = harmful + benign
    scores = concat_layers(prompt_summaries(tiny.model, tiny.tokenizer, layers, prompts), layers).float() @ \
        fit.gate.weight_D + fit.gate.bias
    steering = LayerSteering(None, 0.0, refusal_D=torch.ones(64), beta=1.0, gate=fit.gate)
    skip = template_prefix_length(tiny.tokenizer)
    decided = []
    with patched(tiny.model, {LAYER: steering}, gate_skip=skip) as patch:
        for prompt in prompts:  # one at a time: no padding, the runtime sees exactly what the fit saw
            _logits(tiny.model, torch.tensor([chat_ids(tiny.tokenizer, prompt)]))
            decided.append(bool(patch.layers[LAYER].fired_B.flatten()[0]))
    confident = scores.abs() > 1e-4  # a score at the threshold may round either way between float paths
    assert [d for d, c in zip(decided, confident) if c] == [bool(s > 0) for s, c in zip(scores, confident) if c]
    assert 0 < sum(decided) < len(prompts), "a useful check needs prompts on both sides of the gate"


def test_a_scored_continuation_never_decides_the_gate(tiny):
    """Teacher-forced refusal log-probs: the gate decides on the context's prefill alone, as in generation."""
    from sae_pipeline.evaluation.generation import continuation_logprobs
    from sae_pipeline.steering.runtime import ProbeGate, prompt_summary

    context, continuation = [5, 9, 13, 40, 41], [17, 23, 29, 31, 37, 43]
    direction_D = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(1)), dim=0)

    def score(ids: list[int]) -> float:
        with capture_outputs(tiny.model, [1], site="residual") as captured:
            run_until_captured(tiny.model, torch.tensor([ids]))
        admitted_1S = (torch.arange(len(ids)) >= 1)[None, :]
        return float(prompt_summary(captured[1], admitted_1S, torch.tensor([len(ids) - 1]))[0] @ direction_D)

    alone, with_continuation = score(context), score(context + continuation)
    assert abs(alone - with_continuation) > 1e-3
    bias = -(alone + with_continuation) / 2  # the two readings fall on opposite sides of the threshold
    gate = ProbeGate(direction_D, bias, (1,))
    steering = LayerSteering(None, 0.0, refusal_D=torch.ones(64), beta=1.0, gate=gate)
    with patched(tiny.model, {LAYER: steering}) as patch:
        continuation_logprobs(tiny.model, tiny.tokenizer, [context], continuation, batch_size=1)
        assert bool(patch.layers[LAYER].fired_B.flatten()[0]) == (alone + bias > 0)


def test_a_router_scales_the_refusal_by_the_routed_behaviour_and_reverse_keeps_only_the_sign(tiny, ids, monkeypatch):
    from sae_pipeline.steering.runtime import CategoryRouter, ProbeGate

    always = ProbeGate(torch.zeros(128), 1.0, (1,))
    refusal_D = torch.ones(64)

    def run(bias_C: list[float], scale_C: list[float], reverse: bool = False) -> tuple[list[float], torch.Tensor]:
        router = CategoryRouter(("chem", "bio", "cyber"), torch.zeros(128, 3), torch.tensor(bias_C), (1,))
        steering = LayerSteering(None, 0.0, refusal_D=refusal_D, beta=2.0, gate=always, router=router,
                                 route_scale_C=torch.tensor(scale_C))
        with patched(tiny.model, {LAYER: steering}, gate_skip=3) as patch:
            if reverse:
                with patch.request(REVERSE_TOKEN):
                    out = _logits(tiny.model, ids)
            else:
                out = _logits(tiny.model, ids)
            return patch.layers[LAYER].fired_B.flatten().tolist(), out

    clean = _logits(tiny.model, ids)
    assert run([0.0, 1.0, 0.0], [0.8, 0.5, 0.0])[0] == [0.5, 0.5]  # routed to bio: bio's scale
    off, logits = run([0.0, 0.0, 1.0], [0.8, 0.5, 0.0])  # routed to cyber, which is off
    assert off == [0.0, 0.0] and torch.equal(logits, clean)
    with patched(tiny.model, {LAYER: LayerSteering(None, 0.0, refusal_D=refusal_D, beta=1.0, gate=always)}):
        plain = _logits(tiny.model, ids)
    assert torch.allclose(run([0.0, 1.0, 0.0], [0.8, 0.5, 0.0])[1], run([1.0, 0.0, 0.0], [0.5, 0.8, 0.0])[1])
    assert torch.allclose(run([1.0, 0.0, 0.0], [0.5, 0.0, 0.0])[1], plain, atol=1e-5)  # 0.5 x beta 2 = beta 1
    monkeypatch.setenv("STEER_DEBUG", "1")
    assert run([0.0, 1.0, 0.0], [0.8, 0.5, 0.0], reverse=True)[0] == [1.0, 1.0]
    assert run([0.0, 0.0, 1.0], [0.8, 0.5, 0.0], reverse=True)[0] == [0.0, 0.0]


def test_a_router_must_follow_a_gate_on_its_layers_with_a_scale_per_behaviour(tiny):
    from sae_pipeline.steering.runtime import CategoryRouter, ProbeGate

    router = CategoryRouter(("chem", "bio"), torch.zeros(128, 2), torch.zeros(2), (1,))
    bad = [dict(gate=None), dict(gate=ProbeGate(torch.zeros(128), 0.0, (0,))),
           dict(route_scale_C=torch.ones(3)), dict(route_scale_C=None),
           dict(router=router._replace(weight_DC=torch.zeros(64, 2)))]
    for change in bad:
        fields = {"gate": ProbeGate(torch.zeros(128), 0.0, (1,)), "router": router, "route_scale_C": torch.ones(2),
                  **change}
        with pytest.raises(SteeringError, match="a router follows a gate"):
            apply_patch_layers(tiny.model, {LAYER: LayerSteering(_sidecar(tau=1e4), 0.0, refusal_D=torch.ones(64),
                                                                 beta=1.0, **fields)})
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None
