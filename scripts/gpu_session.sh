#!/usr/bin/env bash
# One GPU session, prepared and tested on CPU at tiny size (the device tool's 15-minute budget).
# Carry the CIFAR archive in .data/ (git-ignored):
#   mkdir -p .data && cp ../shared/cifar10/cifar10-jpeg.tar.xz .data/
#   device run: command "OUT=$OUT bash scripts/gpu_session.sh", carry [".data"] (the device image
#   has torch, safetensors, tqdm, pillow and huggingface_hub; its python is python3)
# Environment knobs (defaults are the real run):
#   OUT            where results go (the device tool's $OUT)      PRESETS   "fast seed"
#   TRAIN_ARGS     extra train.py options (e.g. "--limit-train 200 --epochs 1" for a smoke test)
#   SEED_BUDGET_S  wall-clock cap for the seed preset run (it takes longer than 5 minutes)
#   SKIP_BENCH=1   skip the benchmarks (CPU smoke test)
# CPU smoke test: OUT=/tmp/gpu-smoke SKIP_BENCH=1 TRAIN_ARGS="--limit-train 200 --limit-test 100 --epochs 1" \
#                 bash scripts/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-out}
PRESETS=${PRESETS:-"fast seed"}
TRAIN_ARGS=${TRAIN_ARGS:-}
SEED_BUDGET_S=${SEED_BUDGET_S:-300}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1

echo "== $(date -u +%FT%TZ) $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")')"
if [ ! -d .data/train ]; then
    tar -xJf .data/cifar10-jpeg.tar.xz -C .data
fi
"$PY" - <<'EOF_PY'   # decode once into the uint8 cache (train.py then starts in seconds)
import time
from deq.data import load_cifar10
t = time.time()
for split in ("train", "test"):
    x, y = load_cifar10(".data", split)
    print(split, tuple(x.shape), f"{time.time() - t:.1f}s")
EOF_PY

for preset in $PRESETS; do
    budget=()
    [ "$preset" = seed ] && budget=(timeout --signal=INT "$SEED_BUDGET_S")
    echo "== train --preset $preset"
    "${budget[@]}" "$PY" train.py --preset "$preset" --data .data --out "$OUT/$preset" --no-progress $TRAIN_ARGS \
        || echo "(train --preset $preset stopped: exit $?; its last finished epoch is in $OUT/$preset)"
done

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    echo "== solver benchmark"
    "$PY" -m bench.solvers --device cuda --repeats 5 | tee "$OUT/bench_solvers.txt" || true
    echo "== training benchmark"
    "$PY" -m bench.training --device cuda --batch-size 100 | tee "$OUT/bench_training.txt" || true
fi
rm -f "$OUT"/*/train_state.*   # resume state is not needed back here
echo "== done $(date -u +%FT%TZ)"
