#!/usr/bin/env bash
# TensorRT / TensorRT-RTX end-to-end check on a machine with an NVIDIA GPU:
#   build tiny-kontext engines (one topi engine with a profile per resolution x (anchor + buckets), and the dense
#   baseline) -> `topi-export check` (every profile vs the PyTorch reference) -> `topi-export run --compare`
#   (pruned vs dense loop: time, speedup, PSNR), plain and with CUDA graphs -> a weight-stripped build refitted
#   at load -> a foreign-target refusal -> the GPU / TensorRT tests of tests/test_tensorrt.py.
#
# Usage: scripts/trt_gpu_check.sh [tensorrt|tensorrt-rtx] [OUT_DIR]
#   Backend default: tensorrt when `import tensorrt` works, else tensorrt-rtx on an RTX-class GPU.
#   Env: PRECISION (fp32|fp16|bf16, default fp32), STEPS (default 12), BUCKETS (default 0.3,0.5),
#        RESOLUTIONS (default 128x128,160x96), PLUGINS (1 = register the topi plugins on data-center TensorRT,
#        default 1), STRIP (1 = also build and run a --strip-weights directory, default 1).
# Exit status: 0 all passed, 1 a check failed, 2 no GPU / no TensorRT module here.
set -u -o pipefail
cd "$(dirname "$0")/.."

BACKEND="${1:-}"
OUT="${2:-$(mktemp -d -t topi-trt-check-XXXX)}"
PRECISION="${PRECISION:-fp32}"
STEPS="${STEPS:-12}"
BUCKETS="${BUCKETS:-0.3,0.5}"
RESOLUTIONS="${RESOLUTIONS:-128x128,160x96}"
PLUGINS="${PLUGINS:-1}"
STRIP="${STRIP:-1}"
PY="${PYTHON:-python3}"
CLI=("$PY" -m topi_export.cli)

gpu=$("$PY" - <<'PYEOF'
import torch
if torch.cuda.is_available():
    maj, mnr = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()}|SM{maj}{mnr}")
PYEOF
)
if [ -z "$gpu" ]; then
  echo "no CUDA GPU visible to torch: TensorRT engines need an NVIDIA GPU (TensorRT-RTX engines are built on CPU" \
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
echo "== $BACKEND $TRT_VERSION on $GPU_NAME ($SM), precision $PRECISION, resolutions $RESOLUTIONS," \
     "buckets $BUCKETS, out $OUT"
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }

summary() {  # engines, profiles and target of a built directory
  "$PY" - "$1" <<'PYEOF'
import sys
from topi_export.runtime.manifest import read_manifest
m = read_manifest(sys.argv[1])
print("target:", m.target)
for kind, g in m.graphs.items():
    print(f"{kind}: {g.file} (onnx kept: {g.onnx})")
for p in m.profiles:
    print(f"  profile {p.index}: layout {m.layouts[p.layout].describe()} ratio {p.ratio} keep {p.keep}")
PYEOF
}

build() {  # build NAME [extra flags...]
  local name="$1"; shift
  local args=(build --model tiny-kontext --backend "$BACKEND" --resolutions "$RESOLUTIONS" --ratio-buckets "$BUCKETS"
              --precision "$PRECISION" --dense-baseline --engine-dir "$OUT/$name" --onnx-dir "$OUT/onnx-$PRECISION"
              --force "$@")
  [ "$PLUGINS" = 1 ] || args+=(--no-plugins)
  [ "$BACKEND" = tensorrt ] && args+=(--timing-cache "$OUT/timing.cache")
  local t0=$SECONDS
  "${CLI[@]}" "${args[@]}" || return 1
  echo "build $name: $((SECONDS - t0)) s"
  summary "$OUT/$name"
  if grep -E "PARSER_ERROR|\] ERROR" "$OUT/$name/build_log.txt"; then echo "build log has errors"; return 1; fi
}

exercise() {  # check + run --compare (plain and CUDA graphs) on one engine directory
  local eng="$OUT/$1"
  step "$1: check vs the PyTorch reference"
  "${CLI[@]}" check --engine-dir "$eng" --json "$OUT/$1-check.json" || status=1
  step "$1: run --compare ($STEPS steps)"
  "${CLI[@]}" run --engine-dir "$eng" --steps "$STEPS" --compare --json "$OUT/$1-run.json" || status=1
  step "$1: run --compare with CUDA graphs per (engine, profile, shapes)"
  TOPI_TRT_CUDA_GRAPHS=1 "${CLI[@]}" run --engine-dir "$eng" --steps "$STEPS" --compare \
    --json "$OUT/$1-run-cuda-graphs.json" || status=1
}

step "build (weights in the engines)"
build engines || { echo "BUILD FAILED"; exit 1; }
exercise engines

if [ "$STRIP" = 1 ]; then
  step "build --strip-weights (weight-stripped engines, refitted from onnx/weights.data at load)"
  if build stripped --strip-weights; then exercise stripped; else echo "strip-weights build refused or failed"; status=1; fi
fi

step "refusal of a foreign target (manifest target edited to another compute capability)"
"$PY" - "$OUT/engines" <<'PYEOF' || status=1
import sys
from topi_export.backends.tensorrt import check_target, import_trt, running_target
from topi_export.errors import TopiError
from topi_export.runtime.manifest import read_manifest
m = read_manifest(sys.argv[1])
other = "SM75" if m.target["compute_capabilities"] != ["SM75"] else "SM86"
try:
    check_target(dict(m.target, compute_capabilities=[other]), running_target(import_trt(m.backend), m.backend), m.root)
    print("NOT refused"); sys.exit(1)
except TopiError as e:
    print("refused:", e)
PYEOF

step "pytest (GPU / TensorRT tests)"
"$PY" -m pytest tests/test_tensorrt.py -q -m "gpu or tensorrt or tensorrt_rtx" -rs || status=1

echo
echo "== results in $OUT: *-check.json *-run.json *-run-cuda-graphs.json; status $status"
exit $status
