"""Fused side-nets: the fold of a grouped sidecar, FiLM gates per behaviour, linear composition."""

import contextlib
import json

import pytest
import torch

from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.fused.net import FusedNet, load_fused
from sae_pipeline.steering.runtime import FeatureGroups, grouped_delta
from sae_pipeline.steering.sidecar import DenseSidecar

D = 32
GROUPS = {"chem": 3, "bio": 2}


def _setup(tau: float = -10.0):
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(5, D, generator=generator), dim=-1)
    sidecar = DenseSidecar(directions, torch.randn(5, D, generator=generator), torch.full((5,), tau))
    stats = WhiteningStats(torch.randn(D, generator=generator), torch.rand(D, generator=generator) + 0.5, 40)
    acts = stats.mean_D + stats.std_D * torch.randn(40, D, generator=generator)
    return sidecar, stats, acts


def _runtime(sidecar: DenseSidecar, acts: torch.Tensor, alphas: dict[str, float], epsilon: float = 0.02):
    groups = FeatureGroups.of(GROUPS, alphas)
    z = torch.relu(acts @ sidecar.B_sel_ND.T - sidecar.tau_N)
    return grouped_delta(z, sidecar.A_sel_ND, groups.member_NG, groups.alpha_G, epsilon)[0]


def test_a_folded_sidecar_reproduces_the_runtime_rule_where_its_groups_fire():
    sidecar, stats, acts = _setup()
    net = FusedNet.from_sidecar(sidecar, GROUPS, stats)
    assert net.hidden == 128 and net.behaviors == ("chem", "bio")
    for alphas in ({"chem": 0.8, "bio": 0.0}, {"chem": 0.0, "bio": 1.3}, {"chem": 0.5, "bio": 0.25}):
        expected = _runtime(sidecar, acts, alphas)
        got = net(acts, torch.tensor(list(alphas.values())))
        assert expected.norm() > 0 and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_behaviours_compose_linearly_and_all_gates_at_zero_give_exactly_zero():
    sidecar, stats, acts = _setup()
    net = FusedNet.from_sidecar(sidecar, GROUPS, stats)
    with torch.no_grad():  # any weights, not only the fold's
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    chem, bio = net(acts, torch.tensor([1.0, 0.0])), net(acts, torch.tensor([0.0, 1.0]))
    assert torch.allclose(net(acts, torch.tensor([0.7, 0.4])), 0.7 * chem + 0.4 * bio, atol=1e-5)
    assert torch.equal(net(acts, torch.zeros(2)), torch.zeros_like(acts))
    assert net(acts.bfloat16(), torch.tensor([1.0, 1.0])).dtype == torch.bfloat16


def test_a_group_within_epsilon_is_where_the_fold_and_the_runtime_part():
    sidecar, stats, acts = _setup()
    # chem's three features sit 0.01 above their thresholds on token 0: on, but none above epsilon 0.02
    tau = sidecar.tau_N.clone()
    tau[:3] = acts[0] @ sidecar.B_sel_ND[:3].T - 0.01
    sidecar = DenseSidecar(sidecar.A_sel_ND, sidecar.B_sel_ND, tau)
    net = FusedNet.from_sidecar(sidecar, GROUPS, stats)
    folded, runtime = net(acts, torch.tensor([1.0, 0.0])), _runtime(sidecar, acts, {"chem": 1.0, "bio": 0.0})
    z = torch.relu(acts @ sidecar.B_sel_ND.T - tau)
    loud = (z[:, :3] > 0.02).any(1)
    assert not loud[0] and loud.any() and torch.allclose(folded[loud], runtime[loud], atol=1e-4)
    assert torch.equal(runtime[0], torch.zeros(D)) and folded[0].norm() > 0.005  # the remainder distillation removes


def test_error_gates_fail_when_no_heldout_token_is_steered():
    from sae_pipeline.config import load_gates
    from sae_pipeline.fused.gates import error_gate_results

    exact = {"median_relative": 0.0, "p95_relative": 0.0, "unsteered_p95_norm": 0.0, "gates_off_p95_norm": 0.0,
             "composition_p95_relative": 0.0, "steered_tokens": 0, "tokens": 100}
    failed = {g.name for g in error_gate_results(load_gates().fused, exact) if not g.passed}
    assert failed == {"median_relative_error_max", "p95_relative_error_max", "composition_p95_relative_max"}
    assert all(g.passed for g in error_gate_results(load_gates().fused, {**exact, "steered_tokens": 5}))


def test_bad_folds_fail_with_what_is_wrong():
    sidecar, stats, _ = _setup()
    with pytest.raises(ValueError, match="do not cover"):
        FusedNet.from_sidecar(sidecar, {"chem": 3}, stats)
    with pytest.raises(ValueError, match="more than the 4 hidden units"):
        FusedNet.from_sidecar(sidecar, GROUPS, stats, hidden=4)
    with pytest.raises(ValueError, match="positive std"):
        FusedNet.from_sidecar(sidecar, GROUPS, WhiteningStats(stats.mean_D, torch.zeros(D), 40))
    with pytest.raises(ValueError, match="distinct behaviour names"):
        FusedNet(D, ("chem", "chem"))


def _teacher_setup():
    from sae_pipeline.fused.distill import Teacher

    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(5, D, generator=generator), dim=-1)
    sidecar = DenseSidecar(directions, torch.randn(5, D, generator=generator) / D ** 0.5, torch.full((5,), 1.0))
    acts = torch.randn(3000, D, generator=generator)
    stats = WhiteningStats(acts.mean(0), acts.std(0), len(acts))
    return Teacher(sidecar, FeatureGroups.of(GROUPS, {"chem": 1.0, "bio": 1.0}), 0.02), stats, acts


def test_distillation_learns_the_teacher_from_scratch_and_never_leaves_a_better_fold():
    from sae_pipeline.fused.distill import distill, fused_errors

    teacher, stats, acts = _teacher_setup()
    alphas = torch.tensor([0.8, 0.8])
    scratch = FusedNet(D, tuple(GROUPS), hidden=16)
    with torch.no_grad():
        scratch.mean_D.copy_(stats.mean_D)
        scratch.inv_std_D.copy_(1 / stats.std_D)
    untrained = fused_errors(scratch, teacher, acts[2500:], alphas)
    learned = distill(scratch, teacher, acts[:2000], acts[2000:2500], alphas, steps=300, batch_tokens=512, lr=1e-2,
                      alpha_max=1.0, seed=0)
    assert untrained.median_relative == pytest.approx(1.0, abs=1e-4) and learned.kept_step > 0
    assert learned.losses[-1] < 0.2 * learned.losses[0]
    assert fused_errors(scratch, teacher, acts[2500:], alphas).median_relative < 0.5
    folded = FusedNet.from_sidecar(teacher.sidecar, GROUPS, stats)
    fold_errors = fused_errors(folded, teacher, acts[2000:2500], alphas)
    kept = distill(folded, teacher, acts[:2000], acts[2000:2500], alphas, steps=100, batch_tokens=512, lr=1e-2,
                   alpha_max=1.0, seed=0)
    assert (kept.validation.p95_relative, kept.validation.unsteered_p95_norm) <= (
        fold_errors.p95_relative, fold_errors.unsteered_p95_norm)
    assert kept.validation.gates_off_p95_norm == 0.0 and kept.validation.composition_p95_relative < 1e-4


def test_onnx_matches_torch_at_any_batch_and_length_and_int8_stays_close(tmp_path):
    from sae_pipeline.fused.export import OnnxSideNet, save_int8, save_onnx

    teacher, stats, acts = _teacher_setup()
    net = FusedNet.from_sidecar(teacher.sidecar, GROUPS, stats)
    with torch.no_grad():  # the unused units too: parity must hold for any weights
        net.W1_HD[5:].normal_(0, 0.2)
        net.film_GH[:, 5:].normal_(0, 0.1)
        net.W2_DH[:, 5:].normal_(0, 0.1)
    path = tmp_path / "fused_l2.onnx"
    sha = save_onnx(net, path)
    runtime = OnnxSideNet(path)
    assert runtime.behaviors == ("chem", "bio") and len(sha) == 64
    alphas = torch.tensor([0.8, 0.3])
    for shape in ((1, 7, D), (3, 2, D), (10, D)):
        batch = acts[:int(torch.tensor(shape[:-1]).prod())].reshape(shape)
        assert torch.allclose(runtime(batch, alphas), net(batch, alphas), atol=1e-4)
    assert runtime(acts[:4].bfloat16(), alphas).dtype == torch.bfloat16
    feeds = [(acts[i:i + 100], torch.tensor(a)) for i, a in zip(range(0, 1000, 100), [[1.0, 0.0], [0.0, 1.0]] * 5)]
    int8 = tmp_path / "fused_l2.int8.onnx"
    save_int8(path, int8, feeds, tmp_path / "calibration")
    quantised, exact = OnnxSideNet(int8)(acts[2000:], alphas), net(acts[2000:], alphas)
    relative = (quantised - exact).norm(dim=-1) / (exact.norm(dim=-1) + 1e-6)
    # A8W8 on a toy layer: a few % off the float path (the error gates are measured on real activations)
    assert int8.stat().st_size < 0.5 * path.stat().st_size and relative[exact.norm(dim=-1) > 0].median() < 0.15
    assert (tmp_path / "calibration").exists()
    import onnxruntime

    # a GPU model without onnxruntime-gpu still gets the net, on the CPU provider
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert OnnxSideNet(path, prefer_cuda=True).providers[0] == ("CUDAExecutionProvider" if has_cuda
                                                                else "CPUExecutionProvider")


def test_fused_nets_steer_the_model_as_the_sidecars_they_fold_on_every_backend(tiny, tmp_path, monkeypatch):
    from sae_pipeline.fused.export import save_onnx
    from sae_pipeline.fused.net import FusedNetError, save_fused
    from sae_pipeline import apply_fused_behaviors
    from sae_pipeline.steering.behaviors import apply_behaviors, remove_behaviors
    from sae_pipeline.steering.runtime import REVERSE_TOKEN, SteeringError
    from sae_pipeline.steering.sidecar import save_dense

    layer, generator = 2, torch.Generator().manual_seed(3)
    parts = {}
    for name, n in GROUPS.items():  # always firing: the fold is exact on every token
        directions = torch.nn.functional.normalize(torch.randn(n, 64, generator=generator), dim=-1)
        parts[name] = DenseSidecar(directions, directions.clone(), torch.full((n,), -10.0))
        save_dense(parts[name], tmp_path / f"{name}.safetensors")
    joined = DenseSidecar(*(torch.cat([getattr(parts[b], f) for b in GROUPS]) for f in DenseSidecar._fields))
    net = FusedNet.from_sidecar(joined, GROUPS, WhiteningStats(torch.zeros(64), torch.ones(64), 1))
    files = {"torch": tmp_path / "fused_l2.safetensors", "onnx": tmp_path / "fused_l2.onnx"}
    sha = save_fused(net, files["torch"])
    save_onnx(net, files["onnx"])
    ids = torch.tensor([tiny.tokenizer("steer these words, please").input_ids])
    alphas = {"chem": 0.5, "bio": {layer: 0.3}}

    def logits(apply, prompt: str = "") -> torch.Tensor:
        patch = apply()
        try:
            with torch.no_grad(), patch.request(prompt):
                return tiny.model(input_ids=ids).logits
        finally:
            remove_behaviors(tiny.model)

    paths = {b: {layer: tmp_path / f"{b}.safetensors"} for b in GROUPS}
    sidecars = logits(lambda: apply_behaviors(tiny.model, paths, alphas))
    with torch.no_grad():
        clean = tiny.model(input_ids=ids).logits
    assert not torch.allclose(sidecars, clean, atol=1e-3)
    for backend, path in files.items():
        fused = logits(lambda: apply_fused_behaviors(tiny.model, {layer: path}, alphas))
        assert torch.allclose(fused, sidecars, atol=1e-4), backend
    monkeypatch.setenv("STEER_DEBUG", "1")
    assert torch.allclose(logits(lambda: apply_fused_behaviors(tiny.model, {layer: files["torch"]}, alphas),
                                 REVERSE_TOKEN),
                          logits(lambda: apply_behaviors(tiny.model, paths, alphas), REVERSE_TOKEN), atol=1e-4)
    assert torch.equal(logits(lambda: apply_fused_behaviors(tiny.model, {layer: files["torch"]}, alphas),
                              "<|no-steer|>"), clean)
    with pytest.raises(SteeringError, match=r"unknown behaviours \['cyber'\]"):
        apply_fused_behaviors(tiny.model, {layer: files["torch"]}, {"cyber": 1.0})
    with pytest.raises(SteeringError, match=r"no net: \{'chem': \[5\]\}"):
        apply_fused_behaviors(tiny.model, {layer: files["torch"]}, {"chem": {5: 1.0}})
    with pytest.raises(SteeringError, match="no fused backend 'tflite'"):
        apply_fused_behaviors(tiny.model, {layer: files["torch"]}, backend="tflite")
    files["torch"].write_bytes(files["torch"].read_bytes()[:-4] + b"\1\2\3\4")
    with pytest.raises(FusedNetError, match="sha256"):
        load_fused(files["torch"], sha)
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None


def test_nets_are_fitted_and_calibrated_on_exactly_the_tokens_the_runtime_steers(tiny, tmp_path):
    from sae_pipeline.evaluation.generation import chat_ids
    from sae_pipeline.fused.data import chat_outputs
    from sae_pipeline.model.hooks import layer_outputs
    from sae_pipeline.steering.behaviors import apply_behaviors, remove_behaviors
    from sae_pipeline.steering.sidecar import save_dense

    layer, prompts = 2, ["hi", "steer every token of this longer request"]
    directions = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(5)), dim=-1)
    save_dense(DenseSidecar(directions, directions.clone(), torch.full((2,), -10.0)), tmp_path / "chem.safetensors")
    got = chat_outputs(tiny.model, tiny.tokenizer, prompts, layer, "test")
    clean, steered = [], []
    for prompt in prompts:
        ids = torch.tensor([chat_ids(tiny.tokenizer, prompt)])
        clean.append(layer_outputs(tiny.model, ids, [layer])[layer][0])
        apply_behaviors(tiny.model, {"chem": {layer: tmp_path / "chem.safetensors"}}, {"chem": 1.0})
        try:  # an always-firing rule: the runtime steers every token it may
            steered.append(layer_outputs(tiny.model, ids, [layer])[layer][0])
        finally:
            remove_behaviors(tiny.model)
    touched = torch.cat([(c != s).any(-1) for c, s in zip(clean, steered)])
    assert torch.equal(touched, torch.cat([torch.arange(len(c)) > 0 for c in clean]))  # all but each sink
    assert torch.equal(got, torch.cat(clean)[touched])


def test_each_int8_scheme_quantises_what_it_says(tmp_path):
    import onnx

    from sae_pipeline.fused.export import INT8_SCHEMES, OnnxSideNet, save_int8, save_onnx

    teacher, stats, acts = _teacher_setup()
    net = FusedNet.from_sidecar(teacher.sidecar, GROUPS, stats)
    save_onnx(net, tmp_path / "float.onnx")
    feeds = [(acts[:200], torch.tensor([1.0, 1.0]))]
    for scheme in INT8_SCHEMES:
        save_int8(tmp_path / "float.onnx", tmp_path / f"{scheme}.onnx", feeds, tmp_path / f"{scheme}.json", scheme)
        model = onnx.load(str(tmp_path / f"{scheme}.onnx"))
        assert model.ir_version <= 13, scheme  # what ONNX Runtime 1.30 (the device image's) still reads
        graph = model.graph
        consumers = {name: node for node in graph.node for name in node.input}
        acts_quantised = consumers["acts"].op_type == "QuantizeLinear"
        assert acts_quantised is (scheme in ("a8w8", "a16w8")), scheme
        int16 = any(i.data_type == onnx.TensorProto.INT16 for i in graph.initializer)
        assert int16 is scheme.startswith("a16"), scheme
        int8_weights = {i.name[:5] for i in graph.initializer if i.data_type == onnx.TensorProto.INT8
                        and i.name.startswith(("W1_DH", "W2_HD"))}
        assert int8_weights == ({"W2_HD"} if scheme.endswith("_decoder") else {"W1_DH", "W2_HD"}), scheme
        assert json.loads((tmp_path / f"{scheme}.json").read_text())  # the calibration ranges (or scales), written
        quantised, exact = OnnxSideNet(tmp_path / f"{scheme}.onnx")(acts[:500], torch.ones(2)), net(acts[:500],
                                                                                                   torch.ones(2))
        if scheme.startswith("w8"):  # weight-only: within a per-channel INT8 step of the float net
            relative = (quantised - exact).norm(dim=-1) / (exact.norm(dim=-1) + 1e-6)
            assert relative[exact.norm(dim=-1) > 0].median() < 0.02, scheme
    with pytest.raises(ValueError, match="unknown INT8 scheme 'a4w4'"):
        save_int8(tmp_path / "float.onnx", tmp_path / "x.onnx", feeds, tmp_path / "x.json", "a4w4")


def _fused_release(tmp_path, tiny_d: int = 64, layer: int = 2):
    """A behaviour release (chem and bio at `layer`, always firing) and its fused release (the exact fold)."""
    from sae_pipeline.behaviors.release import concat_sidecars, write_release
    from sae_pipeline.fused.export import save_int8, save_onnx
    from sae_pipeline.fused.net import save_fused
    from sae_pipeline.fused.release import write_fused_release

    generator, parts = torch.Generator().manual_seed(3), {}
    for name, n in GROUPS.items():
        directions = torch.nn.functional.normalize(torch.randn(n, tiny_d, generator=generator), dim=-1)
        parts[name] = DenseSidecar(directions, directions.clone(), torch.full((n,), -10.0))
    write_release(tmp_path / "behaviors", {layer: parts}, {"chem": 0.5, "bio": 0.3}, 64, {"epsilon": 0.02})
    sidecar, sizes = concat_sidecars(parts)
    net = FusedNet.from_sidecar(sidecar, sizes, WhiteningStats(torch.zeros(tiny_d), torch.ones(tiny_d), 1))
    files = {"torch": tmp_path / "n.safetensors", "onnx": tmp_path / "n.onnx", "int8": tmp_path / "n.int8.onnx"}
    save_fused(net, files["torch"])
    save_onnx(net, files["onnx"])
    feeds = [(torch.randn(64, tiny_d, generator=generator), torch.tensor([0.5, 0.3]))]
    save_int8(files["onnx"], files["int8"], feeds, tmp_path / "calibration.json", "a16w8_decoder")
    gates = {backend: [{"name": "p95_relative_error_max", "value": 0.0, "threshold": 0.04,
                        "passed": backend != "int8", "source": "test"}] for backend in files}
    entry = {"files": files, "calibration": tmp_path / "calibration.json", "behaviors": list(sizes), "errors": {}}
    config = write_fused_release(tmp_path / "fused", tmp_path / "behaviors", {layer: entry}, gates)
    return tmp_path / "fused", config


def test_a_fused_release_applies_as_its_behaviour_release_and_fails_closed(tiny, tmp_path):
    from sae_pipeline import apply_behaviors, apply_fused_behaviors, remove_behaviors
    from sae_pipeline.fused.release import FUSED_CONFIG, read_fused_release
    from sae_pipeline.steering.sidecar import SidecarError

    directory, config = _fused_release(tmp_path)
    assert config["default_backend"] == "onnx"  # int8 failed its (test) gate: the next backend that passed
    assert read_fused_release(directory).backend == "onnx"
    with pytest.raises(SidecarError, match=r"the int8 nets failed their error gates \(p95_relative_error_max\)"):
        read_fused_release(directory, "int8")
    assert read_fused_release(directory, "int8", accept_failed_gates=True).files[2].name == "fused_l2.int8.onnx"
    ids = torch.tensor([tiny.tokenizer("steer these words, please").input_ids])

    def logits(apply) -> torch.Tensor:
        apply()
        try:
            with torch.no_grad():
                return tiny.model(input_ids=ids).logits
        finally:
            remove_behaviors(tiny.model)

    sidecars = logits(lambda: apply_behaviors(tiny.model, directory / "behaviors"))
    for backend in ("torch", "onnx"):
        fused = logits(lambda: apply_fused_behaviors(tiny.model, directory, backend=backend))
        assert torch.allclose(fused, sidecars, atol=1e-4), backend
    only_chem = logits(lambda: apply_fused_behaviors(tiny.model, directory, behaviors=["chem"]))
    assert torch.allclose(only_chem, logits(lambda: apply_behaviors(tiny.model, directory / "behaviors",
                                                                    behaviors=["chem"])), atol=1e-4)
    # tampering anywhere fails closed, naming what is wrong
    original = (directory / FUSED_CONFIG).read_text()
    (directory / FUSED_CONFIG).write_text(original.replace('"version": 1', '"version": 9'))
    with pytest.raises(SidecarError, match="version 9"):
        read_fused_release(directory)
    (directory / FUSED_CONFIG).write_text(original.replace('"behaviors": [\n        "chem",\n        "bio"\n      ]',
                                                           '"behaviors": [\n        "bio",\n        "chem"\n      ]'))
    with pytest.raises(SidecarError, match=r"nets for \['bio', 'chem'\]"):
        read_fused_release(directory)
    (directory / FUSED_CONFIG).write_text(original)
    with pytest.raises(SidecarError, match="no 'tflite' nets here"):
        read_fused_release(directory, "tflite")
    behaviour_config = directory / "behaviors" / "multi_behavior_config.json"
    behaviour_config.write_text(behaviour_config.read_text().replace('"alpha": 0.5', '"alpha": 5.0'))
    with pytest.raises(SidecarError, match="does not match its recorded sha256"):
        apply_fused_behaviors(tiny.model, directory)
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None


def test_decode_rates_rotate_every_arm_and_hook_latency_times_each_token(tiny):
    from sae_pipeline.steering.overhead import decode_rates, hook_latencies
    from sae_pipeline.steering.runtime import LayerSteering, patched

    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, 64, generator=generator), dim=-1)
    layers = {2: LayerSteering(DenseSidecar(directions, directions.clone(), torch.full((3,), -10.0)), alpha=0.6)}
    prompts = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])]
    entered = []

    @contextlib.contextmanager
    def peer():  # a peer library's steering: a context manager around the decode
        entered.append(True)
        yield

    rates = decode_rates(tiny.model, prompts, {"unsteered": None, "a": (layers, 1), "b": (layers, 1), "peer": peer},
                         3, 2)
    assert {arm: len(v) for arm, v in rates.items()} == {"unsteered": 4, "a": 4, "b": 4, "peer": 4}
    assert len(entered) == 5  # one untimed warm-up, then every prompt of every round
    assert all(rate > 0 for values in rates.values() for rate in values)
    acts = torch.randn(7, 64, generator=generator)
    latencies = hook_latencies(tiny.model, prompts[0], layers, 1, {2: acts})
    assert len(latencies) == 6 and all(t > 0 for t in latencies)  # the first token warms up, untimed
    with patched(tiny.model, layers) as patch:  # steer is the hook itself
        steered = patch.steer(2, acts[None])
        expected = acts - 0.6 * torch.relu(acts @ directions.T + 10.0) @ directions
        assert torch.allclose(steered[0], expected, atol=1e-5)
