"""Foundation assets: corpus -> activations[layer] -> sae[layer], with the blocking sae_quality check."""

import dagster as dg

from sae_pipeline.activations.harvest import harvest, heldout_windows
from sae_pipeline.config import Profile, load_gates
from sae_pipeline.corpus.build import build_corpus, load_manifest
from sae_pipeline.defs.checks import SAE_QUALITY, gate_check_result
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.metadata import numbers, png_markdown, table
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.layout import activations_root, corpus_dir, sae_layer_dir
from sae_pipeline.sae.run import train_layer_sae

GROUP = "foundation"


def build_foundation_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    layers = dg.StaticPartitionsDefinition([str(layer) for layer in profile.harvest.layers])

    @dg.asset(group_name=GROUP, kinds={"python"},
              description="Benign text corpus from licence-compatible sources, with a manifest and sha256.")
    def corpus(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        loaded = model.load(profile, tokenizer_and_hashes_only=True)
        manifest = build_corpus(profile.corpus, corpus_dir(profile), loaded.tokenizer, loaded.tokenizer_hash)
        context.log.info(f"corpus: {manifest.n_documents} documents, {manifest.n_tokens:,} tokens")
        return dg.MaterializeResult(metadata={
            "sha256": manifest.sha256, "n_documents": manifest.n_documents, "n_tokens": manifest.n_tokens,
            "tokenizer_hash": manifest.tokenizer_hash, "path": dg.MetadataValue.path(str(corpus_dir(profile))),
            "sources": table([{k: row[k] for k in ("name", "kind", "style", "license", "n_documents", "n_tokens")}
                              for row in manifest.sources]),
        })

    @dg.asset(**gpu, group_name=GROUP, deps=[corpus], partitions_def=layers, kinds={"pytorch"},
              backfill_policy=dg.BackfillPolicy.single_run(),
              description="MLP-output activations per hooked layer: one forward pass feeds every layer in the run.")
    def activations(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        loaded = model.load(profile)
        run_layers = sorted(int(key) for key in context.partition_keys)
        root = activations_root(profile, loaded, load_manifest(corpus_dir(profile)).sha256)
        result = harvest(loaded.model, loaded.tokenizer, corpus_dir(profile), root, run_layers, profile.harvest)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(root)), "layers": str(run_layers),
            "model_hash": loaded.model_hash, "train_tokens": result.tokens_per_split["train"],
            "heldout_tokens": result.tokens_per_split["heldout"],
            "forward_tokens_per_second": result.tokens_per_second, "shards_written": result.shards_written,
        })

    @dg.asset(**gpu, group_name=GROUP, deps=[activations], partitions_def=layers, kinds={"pytorch"},
              check_specs=[SAE_QUALITY],
              description="Top-k SAE per layer, whitening folded in; metrics on held-out activations.")
    def sae(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        layer = int(context.partition_key)
        loaded = model.load(profile)
        corpus_sha256 = load_manifest(corpus_dir(profile)).sha256
        root = activations_root(profile, loaded, corpus_sha256)
        out_dir = sae_layer_dir(profile, loaded, corpus_sha256, layer)
        ids = heldout_windows(corpus_dir(profile), loaded.tokenizer, profile.harvest, profile.sae.splice_sequences)
        lineage = {"model_hash": loaded.model_hash, "tokenizer_hash": loaded.tokenizer_hash,
                   "corpus_sha256": corpus_sha256, "activations": root.name}
        report = train_layer_sae(root, layer, profile.sae, profile.harvest, out_dir, loaded.model, ids,
                                 load_gates(), lineage, device=profile.execution.device)
        return dg.MaterializeResult(
            metadata={**numbers(report.metrics), "path": dg.MetadataValue.path(str(report.directory)),
                      "liveness_histogram": png_markdown(report.liveness_png, "liveness histogram"),
                      "training_curve": png_markdown(report.curve_png, "training curve"),
                      "l1_sweep": table(report.sweep), **lineage},
            check_results=[gate_check_result(SAE_QUALITY, report.gates)])

    return [corpus, activations, sae]
