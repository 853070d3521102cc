"""Fused side-nets (issue #6): fused_net[layer] (distilled from the behaviour release's grouped sidecar; check
`fused_net_gates`) -> fused_export[layer] (ONNX and INT8; check `fused_export_gates`) -> fused_release
(artifacts/fused/release/) -> fused_arms[backend] (the frozen harness per backend, and the INT8 path reversed) ->
fused_evaluation (fused_metrics.json; check `fused_gates`). A layer where the release steers no features records
that and holds no net. Harmful prompts go in; only tensors, files of weights and error statistics come out."""

import json
from pathlib import Path
from typing import NamedTuple

import dagster as dg
import torch

from sae_pipeline.activations.store import STATS_FILE, layer_dir, load_stats
from sae_pipeline.behaviors.evaluation import ALL as SIDECARS_ALL
from sae_pipeline.behaviors.release import CONFIG_FILE, read_release
from sae_pipeline.config import Profile, artifacts_root, load_gates
from sae_pipeline.corpus.build import load_manifest
from sae_pipeline.defs.assets.behavior_evaluation import ARM_REDACTION
from sae_pipeline.defs.assets.evaluation import baseline_path, redaction_check_spec, require_audit, steered_run
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import passing_metadata, required_metadata
from sae_pipeline.defs.metadata import numbers, png_markdown, table
from sae_pipeline.defs.resources import ModelResource, TrackingResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.evaluation.generation import chat_ids
from sae_pipeline.evaluation.harness import REVERSE_ARM, load_metrics, load_records
from sae_pipeline.evaluation.plots import rates_png
from sae_pipeline.fused.data import LayerTokens, calibration_feeds, split_tokens
from sae_pipeline.fused.distill import Teacher, fit, fused_errors
from sae_pipeline.fused.evaluation import (
    EXACT_RULE, FusedPolicy, agreements, fused_arm_names, fused_metrics, fused_results)
from sae_pipeline.fused.export import OnnxSideNet, save_int8, save_onnx
from sae_pipeline.fused.gates import error_gate_results, errors_record
from sae_pipeline.fused.net import FusedNet, load_fused, save_fused
from sae_pipeline.fused.plots import distillation_png
from sae_pipeline.fused.release import FUSED_CONFIG, read_fused_release, write_fused_release
from sae_pipeline.fused.runtime import release_layers
from sae_pipeline.gates import GateResult
from sae_pipeline.hashing import file_sha256
from sae_pipeline.layout import activations_root, corpus_dir
from sae_pipeline.steering.overhead import measure_overhead

GROUP = "fused"
NET_GATES, EXPORT_GATES, FUSED_GATES, FUSED_REDACTION = (
    "fused_net_gates", "fused_export_gates", "fused_gates", "fused_arm_redaction")


def _behavior_release(instance: dg.DagsterInstance) -> Path:
    return Path(required_metadata(instance, dg.AssetKey("behavior_release"))["path"]).parent


def _gate_rows(results: list[GateResult], backend: str) -> list[dict]:
    return [{**g._asdict(), "passed": bool(g.passed), "backend": backend} for g in results]


def _check(name: str, rows: list[dict], passed: bool, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={**metadata, **({"gates": table(rows)} if rows else {})})


class Evaluated(NamedTuple):
    """Every fused arm's verified metrics (of this release), the sidecar ensemble's `all` arm, the baseline, their
    pins, each arm's per-prompt agreement and the fused config's sha256."""

    arms: dict[str, dict]
    sidecars: dict
    baseline: dict
    pinned: dict
    agreed: dict
    fused_sha256: str


def _run_row(name: str, run: dict) -> dict:
    """One fused_metrics.json run as a row of the UI table, with its per-prompt agreement."""
    return {"run": name, "completion": run["harmful_completion_rate"],
            "benign_false_refusal": run["benign_false_refusal_rate"],
            "borderline_false_refusal": run["borderline_false_refusal_rate"],
            "next_token_kl": run["capability"]["next_token_kl"],
            **{f"{kind}_vs_{ref}": run["agreement"][ref][kind] for ref in ("sidecars", EXACT_RULE)
               for kind in ("decision_flips", "differing_completions")}}


def build_fused_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    cfg, eval_cfg = profile.fused, profile.evaluation
    layers = dg.StaticPartitionsDefinition([str(layer) for layer in profile.harvest.layers])

    def tokens(loaded, layer: int, split: str) -> LayerTokens:
        return split_tokens(loaded.model, loaded.tokenizer, layer, profile.behaviors.behaviors, split)

    def layer_setup(context: dg.AssetExecutionContext):
        """The partition's layer, the behaviour release, its grouped sidecar there (None: no features steered)."""
        layer = int(context.partition_key)
        release_dir = _behavior_release(context.instance)
        release = read_release(release_dir, accept_failed_gates=True)  # its own gates are its evaluation's
        return layer, release_dir, release, release.groups.get(layer)

    def not_hooked(layer: int, check: str):
        reason = f"the behaviour release steers no features at layer {layer}: no net"
        return dg.MaterializeResult(metadata={"hooked": False, "reason": reason},
                                    check_results=[_check(check, [], True, reason=reason)])

    @dg.asset(**gpu, group_name=GROUP, deps=["behavior_release", "activations"], partitions_def=layers,
              kinds={"pytorch"},
              check_specs=[dg.AssetCheckSpec(NET_GATES, asset="fused_net", blocking=True, description=(
                  "The distilled net against the release's grouped sidecar on held-out tokens (data/gates.yaml "
                  "`fused`): median and p95 relative error, p95 norm with every gate at 0, composition"))],
              description=f"Per layer, a fused side-net ({cfg.hidden} hidden units, per-behaviour FiLM gates) "
                          "distilled from the behaviour release's grouped sidecar: folded in exactly, then trained "
                          "on the tuning prompts' chat tokens (every behaviour's harmful prompts and the benign "
                          "ones, alphas drawn per step), the best validation step kept; error statistics on the "
                          "held-out prompts' tokens. Whitening: the layer's activation-cache statistics.")
    def fused_net(context: dg.AssetExecutionContext, model: ModelResource):
        layer, release_dir, release, groups = layer_setup(context)
        if groups is None:
            return not_hooked(layer, NET_GATES)
        stats_dir = layer_dir(activations_root(profile, model.load(profile),
                                               load_manifest(corpus_dir(profile)).sha256), layer)
        stats = load_stats(stats_dir)
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        teacher = Teacher.of(groups, float(release.config["epsilon"]))
        alphas_G = teacher.groups.alpha_G
        with deterministic(cfg.seed):
            tuning, heldout = tokens(loaded, layer, "tuning").all_ND(), tokens(loaded, layer, "heldout").all_ND()
            net = FusedNet.from_sidecar(groups.sidecar, groups.sizes, stats, cfg.hidden)
            fold = fused_errors(net, teacher, heldout, alphas_G)
            result = fit(net, teacher, tuning, cfg)
            errors = fused_errors(net, teacher, heldout, alphas_G)
        directory = artifacts_root() / "fused" / file_sha256(release_dir / CONFIG_FILE)[:16] / f"l{layer}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"fused_l{layer}.safetensors"
        info = {"layer": layer, "behaviors": list(groups.sizes), "features": dict(groups.sizes),
                "alphas": groups.alphas, "epsilon": teacher.epsilon, "sha256": save_fused(net, path),
                "release_config_sha256": file_sha256(release_dir / CONFIG_FILE),
                "whitening": {"path": str(stats_dir / STATS_FILE), "sha256": file_sha256(stats_dir / STATS_FILE)},
                "distill": {**cfg.model_dump(exclude={"int8_scheme", "backends"}), "kept_step": result.kept_step,
                            "final_loss": result.losses[-1] if result.losses else None,
                            "train_tokens": result.train_tokens, "validation_tokens": result.validation_tokens},
                "heldout_tokens": len(heldout), "errors": {"fold": errors_record(fold), "torch": errors_record(errors)}}
        (directory / "fused_net.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        results = error_gate_results(load_gates().fused, errors_record(errors))
        rows = _gate_rows(results, "torch")
        return dg.MaterializeResult(
            metadata={"hooked": True, "path": dg.MetadataValue.path(str(path)), "sha256": info["sha256"],
                      "behaviors": ",".join(groups.sizes), **numbers({"kept_step": result.kept_step,
                                                                       "heldout_tokens": len(heldout),
                                                                       "steered_tokens": errors.steered_tokens}),
                      "errors": table([{"net": name, **errors_record(e)} for name, e in
                                       (("fold", fold), ("distilled", errors))]),
                      "distillation": png_markdown(distillation_png(result.losses, layer), "distillation loss")},
            check_results=[_check(NET_GATES, rows, all(g.passed for g in results))])

    @dg.asset(**gpu, group_name=GROUP, deps=[fused_net], partitions_def=layers, kinds={"onnx"},
              check_specs=[dg.AssetCheckSpec(EXPORT_GATES, asset="fused_export", blocking=True, description=(
                  "ONNX Runtime parity with PyTorch (<= 1e-4) and the float and INT8 nets' error gates against the "
                  "release's grouped sidecar on held-out tokens (data/gates.yaml `fused`)"))],
              description=f"Per layer, the fused net as ONNX (opset 17, dynamic batch and sequence, whitening "
                          f"folded in) and INT8 (static QDQ, scheme `{cfg.int8_scheme}`, calibrated on every "
                          "behaviour's harmful tuning tokens and the benign ones; calibration cache pinned by "
                          "sha256), each checked in ONNX Runtime on the held-out tokens.")
    def fused_export(context: dg.AssetExecutionContext, model: ModelResource):
        layer, release_dir, release, groups = layer_setup(context)
        if groups is None:
            return not_hooked(layer, EXPORT_GATES)
        made = required_metadata(context.instance, fused_net.key, str(layer))
        net = load_fused(Path(made["path"]), made["sha256"])
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        teacher = Teacher.of(groups, float(release.config["epsilon"]))
        alphas_G = teacher.groups.alpha_G
        with deterministic(cfg.seed):
            tuning, heldout = tokens(loaded, layer, "tuning"), tokens(loaded, layer, "heldout").all_ND()
        directory = Path(made["path"]).parent
        onnx_path, int8_path = directory / f"fused_l{layer}.onnx", directory / f"fused_l{layer}.int8.onnx"
        calibration = directory / f"calibration_l{layer}.json"
        save_onnx(net, onnx_path)
        save_int8(onnx_path, int8_path, calibration_feeds(tuning, net.behaviors, groups.alphas), calibration,
                  cfg.int8_scheme)
        float_net, int8_net = OnnxSideNet(onnx_path), OnnxSideNet(int8_path)
        with torch.no_grad():
            parity = float((float_net(heldout, alphas_G) - net(heldout, alphas_G)).abs().max())
        errors = {"onnx": fused_errors(float_net, teacher, heldout, alphas_G),
                  "int8": fused_errors(int8_net, teacher, heldout, alphas_G)}
        gates = load_gates().fused
        results = {"onnx": error_gate_results(gates, errors_record(errors["onnx"]), parity),
                   "int8": error_gate_results(gates, errors_record(errors["int8"]))}
        info = {"layer": layer, "scheme": cfg.int8_scheme, "onnx_parity_max_abs": parity,
                "net_sha256": made["sha256"], "errors": {b: errors_record(e) for b, e in errors.items()},
                "files": {name: {"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size}
                          for name, p in (("torch", Path(made["path"])), ("onnx", onnx_path), ("int8", int8_path),
                                          ("calibration", calibration))}}
        (directory / "fused_export.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        rows = [row for backend, r in results.items() for row in _gate_rows(r, backend)]
        return dg.MaterializeResult(
            metadata={"hooked": True, "path": dg.MetadataValue.path(str(directory / "fused_export.json")),
                      **numbers({"onnx_parity_max_abs": parity, **{f"{name}_bytes": entry["bytes"]
                                                                   for name, entry in info["files"].items()}}),
                      "errors": table([{"backend": b, **errors_record(e)} for b, e in errors.items()])},
            check_results=[_check(EXPORT_GATES, rows, all(row["passed"] for row in rows))])

    every = dg.AllPartitionMapping()

    @dg.asset(group_name=GROUP, deps=[dg.AssetDep(fused_export, partition_mapping=every), "behavior_release"],
              kinds={"json"},
              description="The fused release, artifacts/fused/release/: the behaviour release it distils (copied: "
                          "refusal routing, alphas, dictionaries), each layer's net as PyTorch, ONNX and INT8 with "
                          "the calibration cache, and fused_config.json pinning them by sha256 with every layer's "
                          "error statistics and each backend's error gates. apply_fused_behaviors(model, that "
                          "directory) applies it (default backend: the first of int8, onnx, torch that passed).")
    def fused_release(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        release_dir = _behavior_release(context.instance)
        release = read_release(release_dir, accept_failed_gates=True)
        release_sha256 = file_sha256(release_dir / CONFIG_FILE)
        entries, gate_rows, gates = {}, {"torch": [], "onnx": [], "int8": []}, load_gates().fused
        for layer in sorted(release.groups):
            made = required_metadata(context.instance, fused_net.key, str(layer))
            exported = required_metadata(context.instance, fused_export.key, str(layer))
            net_info = json.loads((Path(made["path"]).parent / "fused_net.json").read_text())
            export_info = json.loads(Path(exported["path"]).read_text())
            if net_info["release_config_sha256"] != release_sha256 or export_info["net_sha256"] != made["sha256"]:
                raise dg.Failure(f"layer {layer}: the net or its export was made from another release or net; "
                                 "materialise fused_net and fused_export again")
            files = {backend: Path(export_info["files"][backend]["path"]) for backend in ("torch", "onnx", "int8")}
            for backend, path in files.items():
                if file_sha256(path) != export_info["files"][backend]["sha256"]:
                    raise dg.Failure(f"{path} changed since fused_export wrote it; materialise it again")
            errors = {"torch": net_info["errors"]["torch"], **export_info["errors"]}
            entries[layer] = {"files": files, "calibration": Path(export_info["files"]["calibration"]["path"]),
                              "behaviors": net_info["behaviors"], "alphas": net_info["alphas"],
                              "epsilon": net_info["epsilon"], "int8_scheme": export_info["scheme"],
                              "onnx_parity_max_abs": export_info["onnx_parity_max_abs"], "errors": errors,
                              "distill": net_info["distill"], "whitening": net_info["whitening"],
                              "bytes": {b: export_info["files"][b]["bytes"] for b in files}}
            for backend, record in errors.items():
                parity = export_info["onnx_parity_max_abs"] if backend == "onnx" else None
                gate_rows[backend] += [{**row, "layer": layer} for row in _gate_rows(
                    error_gate_results(gates, record, parity), backend)]
        if not entries:
            raise dg.Failure("the behaviour release steers no features at any layer: nothing to fuse")
        directory = artifacts_root() / "fused" / "release"
        config = write_fused_release(directory, release_dir, entries, gate_rows)
        rows = [{"layer": layer, "backend": backend, "bytes": entry["bytes"][backend],
                 **entry["errors"][backend]} for layer, entry in entries.items() for backend in entry["files"]]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(directory / FUSED_CONFIG)),
            "default_backend": str(config["default_backend"]), "layers": ",".join(map(str, entries)),
            "errors": table(rows), "gates": table([row for rows in gate_rows.values() for row in rows])})

    arms = dg.StaticPartitionsDefinition(fused_arm_names(cfg.backends))

    def release_dir_of(instance: dg.DagsterInstance) -> Path:
        return Path(required_metadata(instance, fused_release.key)["path"]).parent

    @dg.asset(**gpu, group_name=GROUP, deps=[fused_release, "refusal_judge"], partitions_def=arms, kinds={"pytorch"},
              check_specs=[redaction_check_spec(FUSED_REDACTION, "fused_arms")],
              description="The fused release on the held-out sets, one backend per arm with every behaviour on "
                          f"(metrics.json with bootstrap CIs); `{REVERSE_ARM}`: the INT8 path reversed (needs "
                          f"STEER_DEBUG=1); `{EXACT_RULE}`: the control, the sidecars' own rule in float32 (how far "
                          "arithmetic alone moves the decisions).")
    def fused_arms(context: dg.AssetExecutionContext, model: ModelResource, tracking: TrackingResource):
        arm = context.partition_key
        reverse = arm == REVERSE_ARM
        require_audit(reverse)
        policy = FusedPolicy.load(release_dir_of(context.instance), "int8" if reverse else arm)
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        _, metadata, check = steered_run(context.instance, tracking, loaded, eval_cfg, policy, 1.0, reverse,
                                         policy.readouts(), f"fused {arm}", FUSED_REDACTION)
        yield dg.MaterializeResult(metadata={**metadata, "arm": arm, "policy_sha256": policy.sha256,
                                             "fused_config_sha256": policy.config_sha256}, check_results=[check])

    def evaluated(instance: dg.DagsterInstance) -> Evaluated:
        """What fused_evaluation and its check read; fails when a run is stale or failed its redaction scan."""
        fused_sha256 = file_sha256(release_dir_of(instance) / FUSED_CONFIG)
        arms_metrics, pinned, records = {}, {}, {}
        for arm in fused_arm_names(cfg.backends):
            meta = passing_metadata(instance, fused_arms.key, [FUSED_REDACTION], arm)
            if meta["fused_config_sha256"] != fused_sha256:
                raise dg.Failure(f"fused_arms {arm} evaluated another release; materialise it again")
            arms_metrics[arm] = load_metrics(Path(meta["path"]))
            records[arm] = load_records(Path(meta["path"]))
            pinned[arm] = {"path": meta["path"], "metrics_sha256": arms_metrics[arm]["metrics_sha256"]}
        sidecar_meta = passing_metadata(instance, dg.AssetKey("behavior_arms"), [ARM_REDACTION], SIDECARS_ALL)
        baseline_dir = baseline_path(instance)
        sidecars, baseline = load_metrics(Path(sidecar_meta["path"])), load_metrics(baseline_dir)
        agreed = agreements(load_records(Path(sidecar_meta["path"])), records)
        pinned["sidecar_ensemble"] = {"path": sidecar_meta["path"], "metrics_sha256": sidecars["metrics_sha256"],
                                      "release_config_sha256": sidecar_meta["release_config_sha256"]}
        pinned["baseline"] = {"path": str(baseline_dir), "metrics_sha256": baseline["metrics_sha256"]}
        return Evaluated(arms_metrics, sidecars, baseline, pinned, agreed, fused_sha256)

    @dg.asset(**gpu, group_name=GROUP, deps=[dg.AssetDep(fused_arms, partition_mapping=every),
                                      dg.AssetDep("behavior_arms", partition_mapping=every), "baseline_metrics"],
              kinds={"json"},
              description="fused_metrics.json: each backend against the sidecar ensemble (the behaviour release's "
                          "every-behaviour arm): harmful completion per category, benign false refusal, capability, "
                          "the reversed INT8 run's recovery, and decode throughput of the default backend "
                          "(interleaved with unsteered decoding).")
    def fused_evaluation(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        runs = evaluated(context.instance)
        directory = release_dir_of(context.instance)
        int8 = read_fused_release(directory, "int8", accept_failed_gates=True)
        if runs.pinned["sidecar_ensemble"]["release_config_sha256"] != \
                int8.config["behavior_release"]["config_sha256"]:
            raise dg.Failure("behavior_arms evaluated another behaviour release than the one fused; materialise "
                             "the arms again")
        results = fused_results(load_gates().fused_evaluation, runs.baseline, runs.sidecars, runs.arms)
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        device = next(loaded.model.parameters()).device
        steering_cfg = profile.steering
        prompts = [r.prompt for r in load_prompt_sets().benign if r.split == "tuning"][:steering_cfg.overhead_prompts]
        overhead = measure_overhead(loaded.model, [torch.tensor([chat_ids(loaded.tokenizer, p)], device=device)
                                                   for p in prompts], *release_layers(int8, device),
                                    steering_cfg.overhead_new_tokens, steering_cfg.overhead_rounds)
        throughput = {"backend": "int8", "overhead": round(overhead.overhead, 6), "device": str(device),
                      "unsteered_tokens_per_s": overhead.unsteered_tokens_per_s,
                      "steered_tokens_per_s": overhead.steered_tokens_per_s}
        report = fused_metrics(runs.baseline, runs.sidecars, runs.arms, results, runs.agreed, throughput,
                               {"fused_config_sha256": runs.fused_sha256, "runs": runs.pinned,
                                "release": str(directory)})
        path = artifacts_root() / "fused" / "evaluation" / runs.fused_sha256[:16] / "fused_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        itself = {"decision_flips": 0, "differing_completions": 0}  # agreement is symmetric: the control's row
        sidecar_run = {**report["sidecar_ensemble"], "agreement": {
            "sidecars": itself, EXACT_RULE: report["backends"][EXACT_RULE]["agreement"]["sidecars"]}}
        rows = [_run_row("sidecar_ensemble", sidecar_run), *(_run_row(n, r) for n, r in report["backends"].items())]
        panels = {"sidecar ensemble": runs.sidecars["harmful_completion_rate"]["per_category"],
                  **{f"fused {arm}": metrics["harmful_completion_rate"]["per_category"]
                     for arm, metrics in runs.arms.items() if arm != REVERSE_ARM}}
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "gates_passed": report["gates"]["passed"],
            **numbers({"int8_throughput_overhead": overhead.overhead}), "runs": table(rows),
            "completion": png_markdown(rates_png(panels, "harmful completion by category, 95% CIs"),
                                       "harmful completion"),
            "gates": table([row for arm, gates in results.items() for row in _gate_rows(gates, arm)])})

    @dg.asset_check(asset=fused_evaluation, name=FUSED_GATES, blocking=True,
                    description="Each backend against the sidecar ensemble (data/gates.yaml `fused_evaluation`), "
                                "recomputed from the hash-verified metrics: harmful completion per category within a "
                                "point, benign false refusal within half a point, capability gates, reverse-safety")
    def fused_gates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        report = json.loads(Path(required_metadata(context.instance, fused_evaluation.key)["path"]).read_text())
        runs = evaluated(context.instance)
        changed = [name for name, run in report["runs"].items() if run["metrics_sha256"] !=
                   runs.pinned[name]["metrics_sha256"]]
        if changed:
            raise dg.Failure(f"the metrics of {changed} changed since fused_metrics.json was written")
        results = fused_results(load_gates().fused_evaluation, runs.baseline, runs.sidecars, runs.arms)
        rows = [row for arm, gates in results.items() for row in _gate_rows(gates, arm)]
        return _check(FUSED_GATES, rows, all(row["passed"] for row in rows))

    return [fused_net, fused_export, fused_release, fused_arms, fused_evaluation, fused_gates]
