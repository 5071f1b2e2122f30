#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine with no network (or any CUDA host):
# device facts, the GPU-marked tests (tests/gpu), then the GPU benchmark (bench/gpu_bench.py).
# Wheels of packages the host lacks may wait in .whl/ (they are installed to /tmp/site first).
# Results go to $OUT (default /tmp/ssf-gpu): device.txt, gpu-tests.log/.xml, gpu-errors.jsonl (every
# measured error), gpu-profile.txt (top kernels, bare vs mixed), gpu-bench.log, 60-gpu.md/.png (the BENCHMARKS.md section).
#     OUT=/tmp/ssf-gpu bash bench/gpu_run.sh [extra gpu_bench args]
set -uo pipefail
OUT=${OUT:-/tmp/ssf-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 SSF_GPU_REPORT=$OUT/gpu-errors.jsonl
rm -f "$SSF_GPU_REPORT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/device.txt"
import torch, timm, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("timm", timm.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())
PY
timeout 240 python3 -m pytest tests/gpu -p no:cacheprovider --confcutdir=tests/gpu -q -rs \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m bench.gpu_tests_report "$SSF_GPU_REPORT" "$(tail -n1 "$OUT/gpu-tests.log" | tr -d '=')" \
    "$(sed -n 3p "$OUT/device.txt")" && cp bench/results/61-gpu-tests.md "$OUT/"
for m in vit_base_patch16_224 tf_efficientnet_lite0; do
    timeout 60 python3 -m bench.gpu_profile --model $m --batch 64 --dtype float16 2>&1 | tee -a "$OUT/gpu-profile.txt"
done
timeout 330 python3 -m bench.gpu_bench "$@" 2>&1 | tee "$OUT/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}
cp bench/results/60-gpu.md bench/results/60-gpu.png "$OUT/" 2>/dev/null
echo "gpu_run: tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
