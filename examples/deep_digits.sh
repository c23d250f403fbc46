#!/usr/bin/env bash
# Deep EP on the bundled 8x8 digits: the deep8 preset (8 convolutions, width 0.5) trained with
# intermediate signals (a local classifier after every block but the top) against the same
# network trained with output-only EP, on the same budget (epochs, T1, T2, beta, lr, seed).
#
#   bash examples/deep_digits.sh [OUT_DIR] [EPOCHS]
#
# --init-scale 5: with PyTorch's default initialisation the forward signal of this 8-layer
# clamp(x/2) network dies out (the top state barely depends on the input); 5x keeps it alive.
set -euo pipefail
OUT=${1:-runs/deep_digits}
EPOCHS=${2:-8}
COMMON=(--preset deep8 --width 0.5 --init-scale 5 --epochs "$EPOCHS" --T1 30 --T2 10 --beta 0.5
        --lr 0.05 --seed 0 --threads 1 --no-progress)
mkdir -p "$OUT"
ep-train "${COMMON[@]}" --signals none --run-dir "$OUT/output_only"
ep-train "${COMMON[@]}" --signals classifier --signal-layers auto --lambda 1.0 --run-dir "$OUT/signals"
python - "$OUT" <<'PY'
import json, sys
for name in ("output_only", "signals"):
    m = json.load(open(f"{sys.argv[1]}/{name}/metrics.json"))
    print(f"{name:12s} final test accuracy {100 * m['final_test_acc']:.2f}%  best {100 * m['best_test_acc']:.2f}%")
PY
