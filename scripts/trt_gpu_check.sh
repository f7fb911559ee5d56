#!/usr/bin/env bash
# TensorRT / TensorRT-RTX end-to-end check on a machine with an NVIDIA GPU:
#   build tiny-kontext engines -> `topi-export check` (every graph and bucket vs the PyTorch reference)
#   -> `topi-export run --compare` (pruned vs unpruned loop: time, speedup, PSNR), plain and with CUDA
#   graphs -> the GPU / TensorRT tests of tests/test_tensorrt.py.
#
# Usage: scripts/trt_gpu_check.sh [tensorrt|tensorrt-rtx] [OUT_DIR]
#   Backend default: tensorrt when `import tensorrt` works, else tensorrt-rtx on an RTX-class GPU.
#   Env: PRECISION (fp32|fp16|bf16, default fp32), STEPS (default 12), BUCKETS (default 0.3,0.5),
#        PLUGINS (1 = register the topi plugins on data-center TensorRT, default 1).
# Exit status: 0 all passed, 1 a check failed, 2 no GPU / no TensorRT module here.
set -u -o pipefail
cd "$(dirname "$0")/.."

BACKEND="${1:-}"
OUT="${2:-$(mktemp -d -t topi-trt-check-XXXX)}"
PRECISION="${PRECISION:-fp32}"
STEPS="${STEPS:-12}"
BUCKETS="${BUCKETS:-0.3,0.5}"
PLUGINS="${PLUGINS:-1}"
PY="${PYTHON:-python3}"
CLI=("$PY" -m topi_export.cli)

gpu=$("$PY" - <<'EOF'
import torch
if torch.cuda.is_available():
    maj, mnr = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()}|SM{maj}{mnr}")
EOF
)
if [ -z "$gpu" ]; then
  echo "no CUDA GPU visible to torch: TensorRT engines need an NVIDIA GPU (builds for TensorRT-RTX run on CPU" \
       "in tests/test_tensorrt.py)" >&2
  exit 2
fi
GPU_NAME="${gpu%%|*}"; SM="${gpu##*|}"
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
if [ -z "$BACKEND" ]; then
  if has tensorrt; then BACKEND=tensorrt
  elif has tensorrt_rtx; then BACKEND=tensorrt-rtx
  else echo "neither tensorrt nor tensorrt_rtx can be imported: pip install tensorrt (data-center) or" \
            "tensorrt-rtx-cu13 (RTX)" >&2; exit 2
  fi
fi
MODULE=$([ "$BACKEND" = tensorrt ] && echo tensorrt || echo tensorrt_rtx)
if ! has "$MODULE"; then echo "--backend $BACKEND needs the Python module $MODULE" >&2; exit 2; fi
case "$BACKEND:$SM" in
  tensorrt-rtx:SM75|tensorrt-rtx:SM80|tensorrt-rtx:SM86|tensorrt-rtx:SM89|tensorrt-rtx:SM120|tensorrt-rtx:SM121|tensorrt:*) ;;
  *) echo "$GPU_NAME ($SM) is not a TensorRT-RTX target (Hopper and data-center GPUs need --backend tensorrt)" >&2
     exit 2 ;;
esac
TRT_VERSION=$("$PY" -c "import $MODULE; print($MODULE.__version__)")
echo "== $BACKEND $TRT_VERSION on $GPU_NAME ($SM), precision $PRECISION, buckets $BUCKETS, out $OUT"
mkdir -p "$OUT"
ENG="$OUT/tiny-kontext-$BACKEND-$PRECISION"
status=0
step() { echo; echo "== $*"; }

step "build"
build_args=(build --model tiny-kontext --backend "$BACKEND" --ratio-buckets "$BUCKETS" --precision "$PRECISION"
            --engine-dir "$ENG" --force)
[ "$PLUGINS" = 1 ] || build_args+=(--no-plugins)
[ "$BACKEND" = tensorrt ] && build_args+=(--timing-cache "$OUT/timing.cache")
t0=$SECONDS
"${CLI[@]}" "${build_args[@]}" || { echo "BUILD FAILED"; exit 1; }
echo "build: $((SECONDS - t0)) s (export + both engines)"
"$PY" - "$ENG" <<'EOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
print("target:", json.dumps(m["target"]))
for kind, g in m["graphs"].items():
    keeps = [p.get("keep") for p in g["profiles"]]
    print(f"{kind}: {g['file']}, {len(g['profiles'])} profile(s) keep={keeps}, plugin layers {g.get('plugin_layers')}")
EOF
grep -E "PARSER_ERROR|\] ERROR" "$ENG/build_log.txt" && { echo "build log has errors"; status=1; }

step "check vs the PyTorch reference"
"${CLI[@]}" check --engine-dir "$ENG" --json "$OUT/check.json" || status=1

step "run --compare ($STEPS steps)"
"${CLI[@]}" run --engine-dir "$ENG" --steps "$STEPS" --compare -q --json "$OUT/run.json" || status=1

step "run --compare with CUDA graphs per (engine, profile)"
TOPI_TRT_CUDA_GRAPHS=1 "${CLI[@]}" run --engine-dir "$ENG" --steps "$STEPS" --compare -q \
  --json "$OUT/run_cuda_graphs.json" || status=1

step "refusal of a foreign target (manifest edited to another compute capability)"
"$PY" - "$ENG" <<'EOF' || status=1
import sys
from topi_export.backends.tensorrt import check_target, import_trt, running_target
from topi_export.errors import TopiError
from topi_export.runtime.manifest import read_manifest
m = read_manifest(sys.argv[1])
target = dict(m.data["target"], compute_capabilities=["SM75" if m.data["target"]["compute_capabilities"] != ["SM75"] else "SM86"])
try:
    check_target(target, running_target(import_trt(m.backend), m.backend), m.path)
    print("NOT refused"); sys.exit(1)
except TopiError as e:
    print("refused:", e)
EOF

step "pytest (GPU / TensorRT tests)"
"$PY" -m pytest tests/test_tensorrt.py -q -m "gpu or tensorrt or tensorrt_rtx" -rs || status=1

echo
echo "== results in $OUT: check.json run.json run_cuda_graphs.json; status $status"
exit $status
