#!/usr/bin/env bash
# The checks that need a GPU (issues #4, #6, #9) as one short command for the device machine. Two steps:
#   here:   bash scripts/device_checks.sh prepare      # wheels the device image lacks -> .device_wheels/ (ignored)
#   device: run(command="bash scripts/device_checks.sh", carry=[".device_wheels"], timeout_s=590)
# (its steps' own limits add to 750 s, more than one call's 600: name steps when time is short; on 2026-11-30 the
# steps took about 300 s in all, `tests peers profile` 178 s). Naming steps runs
# only those: `bash scripts/device_checks.sh tests steering` (steps: tests peers profile profile_auxk steering
# steering_peer fused).
# Results (JSON, and the log) come back under $OUT; copy the figures into benchmarks/README.md.
# The image has torch, transformers, safetensors, pyyaml, onnx(runtime) and pytest, not pydantic or the peers.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "prepare" ]]; then
    exec .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .device_wheels \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        eai-sparsify==1.3.3 schedulefree==1.4.1 simple-parsing==0.1.9 docstring-parser==0.18.0 natsort==8.4.0 \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 steering-vectors==0.12.2
fi
OUT="${OUT:-/tmp/device_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks" TQDM_DISABLE=1 SAE_PIPELINE_ARTIFACTS="$OUT/artifacts"
STEPS=" ${*:-tests peers profile profile_auxk steering steering_peer fused} "
step() {  # step NAME COMMAND...: runs when named; a failing step is reported and the rest still run
    [[ "$STEPS" == *" $1 "* ]] || return 0
    shift
    echo "== $*"
    "$@" || { echo "!! failed: $*"; failed=1; }
}
checks() {
    python3 -m pip install -q --no-deps --no-index .device_wheels/*.whl || echo "no .device_wheels: run prepare here"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    failed=0
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA: the checks below would skip'" || return 1
    # --noconftest: the suite's conftest imports Dagster, which the image lacks; these tests need none of its fixtures
    step tests timeout 120 python3 -m pytest -q -p no:cacheprovider --noconftest sae_pipeline_tests/test_sae.py \
        sae_pipeline_tests/test_cuda_graphs.py -k cuda
    # #9: training throughput at d 4096 x 16,384, k 32, batch 16,384 (the mistral-7b profile), ours vs sparsify
    step peers timeout 180 python3 benchmarks/bench_peers.py --profile mistral-7b --synthetic --device cuda \
        --tokens 2097152 --arms ours ours_host_data sparsify
    cp "$OUT"/artifacts/benchmarks/*.json "$OUT"/ 2>/dev/null
    # #9: where our training step's time goes, by kernel, at the same shapes
    step profile timeout 60 python3 benchmarks/profile_sae_step.py --profile mistral-7b --device cuda \
        --out "$OUT/sae_step_profile_gpu.txt"
    # #9: the same with latents dying after one batch unfired, so every step runs AuxK (its dense sub-SAE over the
    # dead columns, train.auxk_loss)
    step profile_auxk timeout 60 python3 benchmarks/profile_sae_step.py --profile mistral-7b --device cuda \
        --dead-window-tokens 16384 --out "$OUT/sae_step_profile_auxk_gpu.txt"
    # #4, #9: decode overhead of the steering hooks on a Mistral-7B-shaped model at context 2048
    step steering timeout 120 python3 benchmarks/bench_steering.py --mistral-shaped --device cuda --context 2048 --rounds 4 \
        --out "$OUT/steering_gpu.json"
    # #9: the same against steering-vectors applying one vector per hooked layer (a separate step: its failure
    # leaves the figures above standing)
    step steering_peer timeout 90 python3 benchmarks/bench_steering.py --mistral-shaped --device cuda --context 2048 --rounds 3 \
        --peer --out "$OUT/steering_peer_gpu.json"
    # #6: per-token hook latency and decode throughput of the fused nets, same model
    step fused timeout 120 python3 benchmarks/bench_fused.py --mistral-shaped --synthetic --device cuda --context 2048 \
        --rounds 4 --out "$OUT/fused_gpu.json"
    rm -rf "$OUT/artifacts"
    return $failed
}
checks 2>&1 | tee "$OUT/device_checks.log"
exit "${PIPESTATUS[0]}"
