#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CLI's PyTorch backend on CUDA (fp32 and bf16) vs the CPU reference,
# the GPU-marked tests, and a bf16 bench of the mid-size config. Writes results under ${OUT:-gpu_out}.
set -euo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
TX="python3 -m topi_export.cli"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_torch_device.py tests/test_kernels.py 2>&1 | tail -3
for dev in "cpu fp32" "cuda fp32" "cuda bf16"; do
  set -- $dev
  $TX run --model kontext-digits --device "$1" --dtype "$2" --compare -q --json "$OUT/run_$1_$2.json" \
    --out "$OUT/latents_$1_$2.safetensors" | tail -3
done
python3 - "$OUT" <<'PY'
import sys, json
from safetensors.torch import load_file
out = sys.argv[1]
ref = load_file(f"{out}/latents_cpu_fp32.safetensors")["latents"]
for tag in ("cuda_fp32", "cuda_bf16"):
    x = load_file(f"{out}/latents_{tag}.safetensors")["latents"]
    print(tag, "rel L2 vs CPU fp32:", float((x - ref).norm() / ref.norm()))
PY
$TX bench --model mid-kontext --target-grid 64x64 --text-tokens 512 --device cuda --dtype bf16 \
  --policies topi --ratio-buckets 0.3,0.5 --steps 28 --update-interval 10 --repeats 2 \
  --json "$OUT/bench_mid64_cuda_bf16.json" -q | tail -6
