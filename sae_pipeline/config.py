"""One config system: pydantic models validated at the edge, named profiles, and the gates file loader."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGE_ROOT = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_ROOT.parent / "data"
GATES_FILE = DATA_DIR / "gates.yaml"
CORPUS_SOURCES_FILE = DATA_DIR / "corpus_sources.yaml"


def data_dir() -> Path:
    """The frozen datasets: ./data of the repository, or SAE_PIPELINE_DATA (your own prompt sets, same layout)."""
    return Path(os.environ.get("SAE_PIPELINE_DATA", DATA_DIR))


def artifacts_root() -> Path:
    """Everything a run writes lives here, laid out by stage (models/, corpus/, activations/, sae/, ...)."""
    return Path(os.environ.get("SAE_PIPELINE_ARTIFACTS", "./artifacts")).resolve()


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusSource(_Strict):
    """One benign text source. kind decides which fields matter; `license` is recorded in the manifest."""

    name: str
    kind: Literal["pypi_sdist", "python_stdlib", "local", "hf_dataset"]
    license: str
    requirement: str | None = None  # pypi_sdist: "Django==5.2.19"
    include: list[str] = Field(default_factory=list)  # glob patterns inside the source
    path: str | None = None  # local: txt/jsonl/parquet file or directory
    dataset: str | None = None  # hf_dataset: name (online only)
    text_field: str = "text"
    style: Literal["prose", "code", "chat"] = "prose"
    max_chars: int = Field(default=0, ge=0)  # 0 = no cap

    @model_validator(mode="after")
    def _fields_for_kind(self) -> CorpusSource:
        needed = {"pypi_sdist": "requirement", "local": "path", "hf_dataset": "dataset"}.get(self.kind)
        if needed and not getattr(self, needed):
            raise ValueError(f"corpus source {self.name!r} of kind {self.kind} needs `{needed}`")
        return self


class CorpusConfig(_Strict):
    sources: list[CorpusSource]
    min_tokens: int = Field(default=1_000_000, ge=1)
    seed: int = 0


class HarvestConfig(_Strict):
    layers: list[int] = Field(min_length=1)
    context_len: int = Field(default=256, ge=8)
    train_tokens: int = Field(default=1_000_000, ge=1)
    heldout_tokens: int = Field(default=100_000, ge=1)
    shard_tokens: int = Field(default=65_536, ge=64)
    batch_sequences: int = Field(default=16, ge=1)
    # Position 0 carries the attention-sink activation, orders of magnitude off the rest; SAEs skip it.
    skip_positions: int = Field(default=1, ge=0)
    store_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    model_dtype: Literal["bfloat16", "float32"] = "bfloat16"


class SAEConfig(_Strict):
    n_latents: int = Field(gt=0)
    k: int = Field(gt=0)
    k_start: int = Field(gt=0)
    k_anneal_fraction: float = Field(default=0.2, ge=0, le=1)
    l1_coeff: float = Field(default=3e-3, ge=0)
    l1_sweep: list[float] = Field(default_factory=list)  # non-empty: train one SAE per lambda, keep the best
    lr: float = Field(default=2e-3, gt=0)
    lr_decay_fraction: float = Field(default=0.2, ge=0, le=1)  # linear decay to 0 over the last part
    betas: tuple[float, float] = (0.9, 0.95)
    encoder_weight_decay: float = Field(default=1e-5, ge=0)
    batch_tokens: int = Field(default=1024, ge=1)
    epochs: float = Field(default=1.0, gt=0)
    aux_k: int = Field(default=256, ge=0)
    aux_coeff: float = Field(default=1 / 32, ge=0)
    dead_window_tokens: int = Field(default=200_000, ge=1)
    merge_cos: float = Field(default=0.85, gt=0, le=1)
    # at these fractions of training: merge near-duplicates, then resample freed and dead latents
    maintenance_at_fractions: list[float] = Field(default_factory=lambda: [0.6, 0.8, 0.95])
    # a resampled latent's encoder norm, as a multiple of the live latents' mean. Bricken et al.'s 0.2 keeps untrained
    # latents out of the top-k, but with a fifth of the live norm one rarely beats the k-th pre-activation and stays
    # dead; 1.0 leaves fewer dead (k 160: 1.54 % against 1.93 %, data/evidence/sae_r2_frontier.jsonl) when enough
    # training follows the resampling
    resample_encoder_scale: float = Field(default=0.2, gt=0)
    whiten: Literal["diagonal", "scalar", "none"] = "scalar"
    bf16_autocast: bool = True
    checkpoint_every_steps: int = Field(default=200, ge=1)
    seed: int = 0
    splice_sequences: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _k_fits(self) -> SAEConfig:
        if self.k > self.n_latents or self.k_start > self.n_latents:
            raise ValueError(f"k={self.k} / k_start={self.k_start} exceed the dictionary size {self.n_latents}")
        if self.k_start < self.k:
            raise ValueError(f"k_start={self.k_start} must be >= k={self.k} (k anneals down)")
        return self


class EvalConfig(_Strict):
    """The frozen evaluation harness: decoding, judging and bootstrap settings (all enter cfg_hash)."""

    seed: int = 0
    split: Literal["tuning", "heldout"] = "heldout"
    harmful_max_new_tokens: int = Field(default=64, ge=1)
    benign_max_new_tokens: int = Field(default=256, ge=1)
    capability_max_new_tokens: int = Field(default=256, ge=1)
    judge_tokens: int = Field(default=64, ge=1)  # the refusal judges read this many generated tokens
    batch_size: int = Field(default=16, ge=1)
    bootstrap_resamples: int = Field(default=1000, ge=10)
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    model_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    refusal_judge: Literal["embedding", "prefix"] = "embedding"
    # 0 = every prompt; n > 0 keeps the first n per category/domain/kind (smoke runs and tests)
    limit_per_group: int = Field(default=0, ge=0)


class FeatureConfig(_Strict):
    """Feature discovery: which prompts score the latents and how many make the ranking."""

    top_n: int = Field(default=512, ge=1)
    split: Literal["tuning"] = "tuning"  # held-out prompts stay for the evaluation
    batch_size: int = Field(default=16, ge=1)
    seed: int = 0
    # the causal screen (features/causal.py): issue #4 asks for +-2 sigma, replies of up to 48 tokens, 200 benign
    # prompts, several seeds and 8 kept features
    screen_candidates: int = Field(default=24, ge=1)  # top of the ranking, screened by refusal log-prob
    screen_decode_candidates: int = Field(default=10, ge=1)  # of those, screened by decoding
    screen_sigmas: float = Field(default=2.0, gt=0)
    screen_seeds: int = Field(default=3, ge=1)
    screen_harmful_batch: int = Field(default=32, ge=1)
    screen_benign_prompts: int = Field(default=200, ge=1)
    screen_max_new_tokens: int = Field(default=48, ge=1)
    screen_keep: int = Field(default=8, ge=1)
    screen_max_benign_spike: float = Field(default=0.02, ge=0, le=1)  # allowed rise in benign false refusal


# the harm categories of the prompt sets, which are also the behaviours steered one by one
HARM_CATEGORIES = ("chem", "bio", "cyber", "violence", "self_harm", "fraud")


class BehaviorConfig(_Strict):
    """Per-behaviour dictionaries (issue #5). The order of `behaviors` is the order cross-talk fixes them in."""

    behaviors: list[str] = Field(default_factory=lambda: list(HARM_CATEGORIES), min_length=1)
    max_layers: int = Field(default=3, ge=1)  # layers per behaviour, best probe AUROC first
    top_n: int = Field(default=128, ge=1)  # ranked and kept features per behaviour and layer
    min_deflated_norm: float = Field(default=0.5, gt=0, le=1)  # a flagged direction must keep this much length
    # each behaviour sidecar: at most this many of its features that passed the cross-talk filter and its causal
    # quick screen (as many as the single-basis screen keeps, issue #4: 8)
    sidecar_features: int = Field(default=8, ge=1)
    # the quick screen (issue #5: "as in the single-basis screen"), on the behaviour's harmful tuning prompts and a
    # benign slice, smaller than the single-basis screen: decoding costs ~1.5 min per candidate on 2 CPU cores, and
    # at layer 11 the log-prob stage moved the refusal log-prob by < 0.01 nats for every chem candidate, so two
    # decoded candidates per behaviour; the other screen settings (sigmas, reply length, benign spike) are `features'`
    screen_candidates: int = Field(default=12, ge=1)
    screen_decode_candidates: int = Field(default=2, ge=1)
    screen_seeds: int = Field(default=2, ge=1)
    screen_harmful_batch: int = Field(default=16, ge=1)
    screen_benign_prompts: int = Field(default=100, ge=1)
    # every behaviour's strength in the release: its feature rule's alpha and, times steering.refusal_beta, its
    # refusal strength; the single-basis operating point chose 0.8 on the held-out sweep (issue #4)
    alpha: float = Field(default=0.8, ge=0)

    def screen_config(self, features: FeatureConfig) -> FeatureConfig:
        """The feature screen's settings with this quick screen's sizes, keeping sidecar_features."""
        return features.model_copy(update={
            "screen_candidates": self.screen_candidates, "screen_decode_candidates": self.screen_decode_candidates,
            "screen_seeds": self.screen_seeds, "screen_harmful_batch": self.screen_harmful_batch,
            "screen_benign_prompts": self.screen_benign_prompts, "screen_keep": self.sidecar_features})

    @model_validator(mode="after")
    def _known(self) -> BehaviorConfig:
        unknown = sorted(set(self.behaviors) - set(HARM_CATEGORIES))
        if unknown or len(set(self.behaviors)) != len(self.behaviors):
            raise ValueError(f"behaviors must be distinct names from {list(HARM_CATEGORIES)}, got {self.behaviors}")
        return self


class SteeringConfig(_Strict):
    """The conditional refusal mode's ingredients (fit on the tuning prompts) and the strength sweep."""

    max_benign_fire: float = Field(default=0.02, gt=0, lt=1)  # the probe gate's cross-validated benign budget
    # the borderline-safe tuning prompts' own out-of-fold budget and fit weight (1.0 / 1.0: their fire is reported,
    # not bounded). Held to 2 % at weight 10, cross-validation picked layer 14 (92.0 % harmful, 1.9 % borderline out
    # of fold, data/evidence/gate_borderline.jsonl) and the held-out borderline gate was met, but benign false refusal
    # rose to 3.2 % and perplexity by 1.8-3.5 % at alpha >= 0.6 (data/evidence/steering_frontier.jsonl): off by default
    borderline_max_fire: float = Field(default=1.0, gt=0, le=1)
    borderline_weight: float = Field(default=1.0, gt=0)
    gate_folds: int = Field(default=5, ge=2)
    refusal_prompts: int = Field(default=60, ge=1)  # tuning harmful prompts behind the refusal direction
    # candidate layer sets for the probe gate (the residual stream after each layer, summarised per prompt as its
    # mean and its last token; no SAE needed); cross-validation on the tuning prompts picks one. That summary beat
    # MLP-output means out of fold (data/evidence/gate_inputs.jsonl)
    gate_layer_sets: list[list[int]] = Field(
        default_factory=lambda: [[9], [11], [13], [11, 13], [9, 11, 13]], min_length=1)
    # where the refusal vector goes in (MLP output) and the gate decides, after every gate layer: with the vector
    # added unconditionally, 98 % of 48 tuning harmful prompts refused at layer 15, 92 % at 17 (see refusal_beta)
    refusal_layer: int = Field(default=15, ge=1)
    # alpha is one strength knob: the feature rule's alpha at the screened layers and alpha * refusal_beta on the
    # refusal vector at refusal_layer; alpha 0 is the unsteered model
    alpha_grid: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2], min_length=1)
    # measured on 48 tuning harmful prompts, refusal vector added unconditionally (judge, 32 tokens): beta 1.0 / 1.5
    # refused 98 % / 98 % at layer 15 and 92 % / 96 % at layer 17; 1.25 puts the grid's 0.8-1.2 over that range
    refusal_beta: float = Field(default=1.25, ge=0)
    epsilon: float = Field(default=0.02, ge=0)
    sidecar_nnz: int = Field(default=256, ge=1)  # SAE8: stored entries per feature row (issue #4: 256)
    # the multi-layer ensemble (steering/ensemble.py): named per-layer alpha schedules over the hooked layers (the
    # refusal mode goes in at the layers after the gate's, with each layer's own refusal direction; features at the
    # screened layers), then a +-ensemble_grid_step grid around the better one and a layer ablation
    ensemble_schedules: dict[str, dict[int, float]] = Field(default_factory=dict)
    ensemble_grid_step: float = Field(default=0.1, gt=0)
    # decode tokens/s with and without the operating point, interleaved rounds (the throughput gate)
    overhead_prompts: int = Field(default=4, ge=1)
    overhead_new_tokens: int = Field(default=48, ge=2)
    overhead_rounds: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _sorted(self) -> SteeringConfig:
        if self.alpha_grid != sorted(set(self.alpha_grid)) or self.alpha_grid[0] != 0.0:
            raise ValueError(f"alpha_grid must be increasing and distinct and start at 0.0 (the unsteered run every "
                             f"strength is compared with), got {self.alpha_grid}")
        bad = [layers for layers in self.gate_layer_sets if not layers or layers != sorted(set(layers))]
        if bad:
            raise ValueError(f"gate_layer_sets must be non-empty increasing layer lists, got {bad}")
        bad_schedules = {name: alphas for name, alphas in self.ensemble_schedules.items()
                         if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or any(a < 0 for a in alphas.values())}
        if bad_schedules:
            raise ValueError(f"ensemble schedules need lower-case names and alphas >= 0, got {bad_schedules}")
        late = [layers for layers in self.gate_layer_sets if layers[-1] >= self.refusal_layer]
        if late:
            raise ValueError(f"gate layers must lie before refusal_layer {self.refusal_layer} (the gate decides "
                             f"there, within the same prefill), got {late}")
        return self


class FusedConfig(_Strict):
    """Fused side-nets (issue #6): distillation from the behaviour release's grouped sidecars, exports, backends."""

    hidden: int = Field(default=128, ge=1)  # issue #6: 128 hidden units per layer
    steps: int = Field(default=1500, ge=0)  # 0: the exact fold, untrained
    batch_tokens: int = Field(default=1024, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    # each step draws every behaviour's alpha: off half the time, else uniform up to alpha_max (past the release's)
    alpha_max: float = Field(default=1.2, gt=0)
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # of the tuning tokens: keeps the best step
    seed: int = 0
    # fused/export.py's INT8_SCHEMES; the static, calibrated a16w8_decoder meets every error gate on the release's
    # net and on a 48-feature stress net (held-out p95 0.15 % and 3.0 %); a8w8, a16w8 and a8w8_decoder do not
    # (data/evidence/fused_int8.jsonl, rows of 2026-11-30: the tokens without the attention sinks)
    int8_scheme: Literal["a8w8", "a16w8", "a8w8_decoder", "a16w8_decoder", "w8", "w8_decoder"] = "a16w8_decoder"
    # the harness sweep: each backend with every behaviour on, and the INT8 path reversed (an audit run)
    backends: list[Literal["torch", "onnx", "int8"]] = Field(default_factory=lambda: ["torch", "onnx", "int8"],
                                                             min_length=1)


class SmokeConfig(_Strict):
    """The nightly smoke (issue #8): the current release on a fixed held-out shard against its reference run."""

    per_group: int = Field(default=2, ge=1)  # the first n held-out prompts of every category, domain, task kind
    cron: str = "0 3 * * *"  # UTC

    @model_validator(mode="after")
    def _cron(self) -> SmokeConfig:
        if len(self.cron.split()) != 5:
            raise ValueError(f"smoke.cron must be a five-field cron expression (UTC), got {self.cron!r}")
        return self


class AuditConfig(_Strict):
    """The adversarial audit (issue #7): the locked suite in data/audit/ on the current release."""

    items_per_variant: int = Field(default=0, ge=0)  # 0: the whole suite; a slice for quick profiles
    capability_tasks_per_kind: int = Field(default=20, ge=1)
    # per-language multipliers on the release's alphas tried by the locale tuning (issue #7: within [0.8, 1.1])
    locale_multipliers: list[float] = Field(default_factory=lambda: [0.8, 0.9, 1.0, 1.1], min_length=1)
    diagnostic_items: int = Field(default=60, ge=1)  # failing harmful items (and as many benign) the diagnostics rerun
    alpha_step: float = Field(default=0.05, gt=0)  # per-behaviour alpha +- this in the diagnostics
    latency_prompts: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _multipliers(self) -> AuditConfig:
        bad = [m for m in self.locale_multipliers if not 0.8 <= m <= 1.1]
        if bad or 1.0 not in self.locale_multipliers:
            raise ValueError(f"audit.locale_multipliers must lie in [0.8, 1.1] and include 1.0, got "
                             f"{self.locale_multipliers}")
        return self


class KubernetesConfig(_Strict):
    """Where and how GPU steps run under dagster-k8s's k8s_job_executor (one pod per step)."""

    namespace: str | None = None  # None: the run's own namespace
    image: str | None = None  # None: the run's image
    gpus_per_step: int = Field(default=1, ge=1)
    cpu: str = "8"
    memory: str = "64Gi"  # Mistral-7B bf16 weights (14.5 GB) plus activation shards in flight: docs/scaling.md
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = Field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


class ExecutionConfig(_Strict):
    """How steps run (issue #8): in one process, in subprocesses with at most `gpu_concurrency` GPU steps at once,
    or as Kubernetes jobs whose GPU steps request `nvidia.com/gpu`. SAE_PIPELINE_EXECUTOR overrides `executor`."""

    executor: Literal["in_process", "multiprocess", "k8s"] = "multiprocess"
    device: Literal["cpu", "cuda"] = "cpu"  # where ModelResource puts the model
    max_concurrent: int = Field(default=0, ge=0)  # 0: one step per CPU core (Dagster's default)
    gpu_concurrency: int = Field(default=1, ge=1)  # GPU steps at once in one run (the `gpu` tag limit)
    kubernetes: KubernetesConfig = KubernetesConfig()


class Profile(_Strict):
    name: str
    model: str | None  # None = the embedded SmolLM2-135M-Instruct
    d_model: int
    n_layers: int
    corpus: CorpusConfig
    harvest: HarvestConfig
    sae: SAEConfig
    evaluation: EvalConfig = EvalConfig()
    features: FeatureConfig = FeatureConfig()
    steering: SteeringConfig = SteeringConfig()
    behaviors: BehaviorConfig = BehaviorConfig()
    fused: FusedConfig = FusedConfig()
    smoke: SmokeConfig = SmokeConfig()
    audit: AuditConfig = AuditConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @model_validator(mode="after")
    def _layers_exist(self) -> Profile:
        gate_layers = [layer for layers in self.steering.gate_layer_sets for layer in layers]
        bad = [layer for layer in self.harvest.layers + gate_layers + [self.steering.refusal_layer]
               if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range for a {self.n_layers}-layer model")
        stray = {name: sorted(set(alphas) - set(self.harvest.layers))
                 for name, alphas in self.steering.ensemble_schedules.items()}
        if any(stray.values()):
            raise ValueError(f"ensemble schedules may only name hooked layers {self.harvest.layers}, got {stray}")
        return self

    def updated(self, **sections: dict) -> Profile:
        """A copy with nested fields overridden, re-validated (e.g. updated(sae={"k": 16}))."""
        data = self.model_dump()
        for section, values in sections.items():
            if isinstance(data.get(section), dict):
                data[section] = {**data[section], **values}
            else:
                data[section] = values
        return validate_profile(data)


def validate_profile(data: dict) -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid profile {data.get('name', '?')!r}: {err}") from err


def _default_corpus() -> CorpusConfig:
    raw = yaml.safe_load(CORPUS_SOURCES_FILE.read_text())
    return CorpusConfig.model_validate(raw)


def _profiles() -> dict[str, dict]:
    corpus = _default_corpus().model_dump()
    # 8x d_model latents (4,608) at k 192 (warm-up from 256): at d 576 the reference k 32 reaches held-out R2 >= 0.90
    # only at layer 11. At layer 15 R2 moves with k, not with latents or tokens: 0.76-0.79 at k 32 up to 18,432
    # latents or 6 epochs, 0.89 at k 128, 0.90 at k 160, 0.91 at k 192 (data/evidence/sae_r2_frontier.jsonl); k 192
    # is 1/24 of the dictionary. At that k dead latents come back within a tenth of training after each resampling,
    # so they are found sooner (a 20k-token window) and resampled every 5 % of training from half-way, at the live
    # latents' encoder norm: every SAE gate passes at layers 9, 15, 17 and 19 in 2 x 1M tokens.
    # lambda 0: at k 192, 3e-3 left more latents dead (15.8 % against 9.9 % under the older maintenance), and dead
    # latents are the gate k 192 only just meets (0.22-0.43 % against 0.5 %).
    smollm2_sae = dict(n_latents=4608, k=192, k_start=256, epochs=2.0, l1_coeff=0.0, dead_window_tokens=20_000,
                       maintenance_at_fractions=[round(0.5 + 0.05 * i, 2) for i in range(10)],
                       resample_encoder_scale=1.0)
    return {
        "smollm2": dict(
            name="smollm2", model=None, d_model=576, n_layers=30, corpus=corpus,
            harvest=dict(layers=[9, 11, 15, 17, 19]), sae=smollm2_sae,
            # mid-heavy: the operating point's strength (0.8) from the middle layers on, tapering late; late-focused:
            # the weight at 17 and 19 (9 and 11 carry no screened features: inert today)
            steering=dict(ensemble_schedules={"mid_heavy": {9: 0.8, 11: 0.8, 15: 0.8, 17: 0.4, 19: 0.0},
                                              "late_focused": {9: 0.0, 11: 0.0, 15: 0.4, 17: 0.8, 19: 0.8}}),
        ),
        # the nightly smoke and the integration tests: real model, two prompts per group, short replies
        "smollm2-smoke": dict(
            name="smollm2-smoke", model=None, d_model=576, n_layers=30, corpus=corpus,
            harvest=dict(layers=[15]), sae=smollm2_sae,
            evaluation=dict(limit_per_group=2, benign_max_new_tokens=64, capability_max_new_tokens=64),
        ),
        "smollm2-pilot": dict(
            name="smollm2-pilot", model=None, d_model=576, n_layers=30, corpus=corpus,
            harvest=dict(layers=[15]), sae=smollm2_sae,
        ),
        "mistral-7b": dict(
            name="mistral-7b", model="mistralai/Mistral-7B-Instruct-v0.2", d_model=4096, n_layers=32,
            corpus=corpus,
            harvest=dict(layers=[10, 12, 16, 18, 20], train_tokens=50_000_000, heldout_tokens=500_000,
                         context_len=1024, batch_sequences=8),
            steering=dict(gate_layer_sets=[[12], [14], [16], [12, 14], [14, 16]], refusal_layer=18,
                          ensemble_schedules={"mid_heavy": {10: 0.8, 12: 0.8, 16: 0.8, 18: 0.8, 20: 0.4},
                                              "late_focused": {10: 0.0, 12: 0.0, 16: 0.4, 18: 0.8, 20: 0.8}}),
            sae=dict(n_latents=16384, k=32, k_start=64, batch_tokens=16384, aux_k=2048,
                     dead_window_tokens=10_000_000),
            execution=dict(device="cuda"),  # 7B on CPU is out of reach: docs/scaling.md
        ),
        "tiny": dict(
            name="tiny", model="tiny-random-llama", d_model=64, n_layers=6,
            corpus=dict(min_tokens=1, sources=[dict(
                name="python-stdlib-json", kind="python_stdlib", license="PSF-2.0", style="code",
                include=["json/*.py", "textwrap.py"], max_chars=120_000)]),
            harvest=dict(layers=[1, 3], context_len=32, train_tokens=4096, heldout_tokens=1024,
                         shard_tokens=1024, batch_sequences=8, model_dtype="float32", store_dtype="float32"),
            sae=dict(n_latents=128, k=8, k_start=16, batch_tokens=256, epochs=2.0, aux_k=32,
                     dead_window_tokens=2048, checkpoint_every_steps=8, splice_sequences=4),
            evaluation=dict(limit_per_group=1, harmful_max_new_tokens=12, benign_max_new_tokens=12,
                            capability_max_new_tokens=8, judge_tokens=12, model_dtype="float32",
                            bootstrap_resamples=200),
            features=dict(screen_candidates=4, screen_decode_candidates=3, screen_seeds=2,
                          screen_harmful_batch=3, screen_benign_prompts=4, screen_max_new_tokens=6, screen_keep=2),
            behaviors=dict(screen_candidates=3, screen_decode_candidates=2, screen_seeds=1, screen_harmful_batch=2,
                           screen_benign_prompts=3, sidecar_features=2),
            steering=dict(gate_layer_sets=[[1], [1, 2]], refusal_layer=3, gate_folds=2, refusal_prompts=4,
                          alpha_grid=[0.0, 1.0], ensemble_schedules={"mid_heavy": {1: 1.0, 3: 1.0},
                                                                      "late_focused": {1: 0.0, 3: 1.0}},
                          overhead_prompts=1, overhead_new_tokens=4, overhead_rounds=1),
            fused=dict(steps=20, batch_tokens=256),
            smoke=dict(per_group=1),
            audit=dict(items_per_variant=2, capability_tasks_per_kind=2, locale_multipliers=[0.9, 1.0],
                       diagnostic_items=2, latency_prompts=2),
        ),
    }


PROFILE_NAMES = ("smollm2", "smollm2-smoke", "smollm2-pilot", "mistral-7b", "tiny")


def load_profile(name: str | None = None) -> Profile:
    """A named profile; None reads SAE_PIPELINE_PROFILE (default: the embedded SmolLM2). SAE_PIPELINE_EXECUTOR
    picks the executor (in_process, multiprocess, k8s) without editing the profile; k8s also puts the model on
    cuda."""
    name = name or os.environ.get("SAE_PIPELINE_PROFILE", "smollm2")
    profiles = _profiles()
    if name not in profiles:
        raise ConfigError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILE_NAMES)}")
    data = profiles[name]
    executor = os.environ.get("SAE_PIPELINE_EXECUTOR")
    if executor:
        data = {**data, "execution": {**data.get("execution", {}), "executor": executor,
                                      **({"device": "cuda"} if executor == "k8s" else {})}}
    return validate_profile(data)


class Gate(_Strict):
    value: float
    source: str
    evidence: str | None = None  # where the measurements behind an unmet gate are kept


class Gates(_Strict):
    sae_quality: dict[str, Gate]
    datasets: dict[str, Gate]
    judge_accuracy: dict[str, Gate]
    baseline: dict[str, Gate]
    redaction: dict[str, Gate]
    steering: dict[str, Gate]
    behaviors: dict[str, Gate]
    behavior_evaluation: dict[str, Gate]
    fused: dict[str, Gate]
    fused_evaluation: dict[str, Gate]
    smoke: dict[str, Gate]
    audit: dict[str, Gate]


def gates_path() -> Path:
    """The gates file in effect: SAE_PIPELINE_GATES points elsewhere (tests use it to force a pass or a failure)."""
    return Path(os.environ.get("SAE_PIPELINE_GATES", GATES_FILE))


def load_gates(path: Path | None = None) -> Gates:
    """The gates file (default: gates_path())."""
    return _load_gates(Path(path or gates_path()))


@lru_cache(maxsize=8)
def _load_gates(path: Path) -> Gates:
    try:
        return Gates.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, ValidationError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the gates file {path}: {err}") from err
