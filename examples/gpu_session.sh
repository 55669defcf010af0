#!/usr/bin/env bash
# What gradq needs measured on a lent GPU, one device call (the device tool's `run`) each:
#   bash examples/gpu_session.sh [QUICK]           GPU tests, kernel bench, DeiT-B step bench
#   bash examples/gpu_session.sh STEP MODEL BATCH [PX]  one more step bench (the GPU
#        targets: swin_base_patch4_window7_224 64, mobilevit_s 128 224, mobilevit_xxs 128 224)
# installs gradq into the machine's python3 (torch, triton and timm are already there; nothing
# is fetched) and leaves the results in $OUT (at most 8 files come back): gpu-tests.log,
# kernels.json, kernels.png, deit_b.json (or MODEL.json), bench.log. QUICK skips the DeiT-B
# step benchmark (the longest part). A device call may run 10 minutes at most.
set -uo pipefail
OUT=${OUT:-out/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Each autotuning of gradq's kernels prints its duration into bench.log: the share of gradq's
# compile time (the target: at most 2x bf16 torch.compile's) that tile tuning takes.
export TRITON_PRINT_AUTOTUNING=1
log="$OUT/bench.log"

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  # The versions found, against the stacks gradq is tested with (gradq_fx/versions.py).
  python3 gradq_fx/versions.py check
} >"$log" 2>&1

python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$log" 2>&1 || exit 1

if [ "${1:-}" = "STEP" ]; then
  model=${2:?STEP needs a timm model name}
  batch=${3:?STEP needs a batch size}
  size=()
  [ -n "${4:-}" ] && size=(--img-size "$4")
  python3 -m gradq_fx bench --model "$model" --batch-size "$batch" "${size[@]}" \
    --out "$OUT/step" >>"$log" 2>&1
  cp "$OUT"/step/bench.json "$OUT/$model.json" 2>/dev/null
  rm -rf "$OUT/step"
  tail -n 40 "$log"
  exit 0
fi

# GPU tests: kernels against their references, compiled models reaching the kernels.
python3 -m pytest -q -m gpu -p no:cacheprovider >"$OUT/gpu-tests.log" 2>&1
tail -n 3 "$OUT/gpu-tests.log"

# Kernels alone: ViT-B's linear shapes at batch 128, each role, against cuBLAS bf16 and _int_mm.
python3 -m gradq_fx bench --kernels --model deit_base_patch16_224 --batch-size 128 \
  --out "$OUT/kernels" >>"$log" 2>&1
cp "$OUT"/kernels/kernels.json "$OUT"/kernels/kernels.png "$OUT"/ 2>/dev/null

if [ "${1:-}" != "QUICK" ]; then
  # One training step: fp32 eager, bf16 eager, bf16 torch.compile and gradq, DeiT-B batch 128.
  python3 -m gradq_fx bench --model deit_base_patch16_224 --batch-size 128 \
    --out "$OUT/deit_b" >>"$log" 2>&1
  cp "$OUT"/deit_b/bench.json "$OUT"/deit_b.json 2>/dev/null
fi
rm -rf "$OUT/kernels" "$OUT/deit_b"
tail -n 40 "$log"
