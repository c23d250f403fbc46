#!/usr/bin/env bash
# Deep EP on the bundled 8x8 digits: the deep8 preset (8 convolutions, 16-32-64-64 channels)
# trained with intermediate signals (a local classifier after every block but the top, on the
# state average-pooled to 2x2) against the same network trained with output-only EP, on the
# same budget (epochs, T1, T2, beta, lr), for several seeds. Both pairs of a seed run side by
# side, one thread each.
#
#   bash examples/deep_digits.sh [OUT_DIR] [EPOCHS] [SEEDS]
#
# The preset's own initialisation and schedule are used (centred filters times 3, alternating
# updates: see ep_kernels/models.py for why). Results of one run are in
# examples/results/deep_digits.txt.
set -euo pipefail
OUT=${1:-runs/deep_digits}
EPOCHS=${2:-20}
SEEDS=${3:-"0 1 2"}
COMMON=(--preset deep8 --epochs "$EPOCHS" --batch-size 16 --T1 40 --T2 12 --beta 0.5 --lr 0.01 --threads 1
        --no-progress)
mkdir -p "$OUT"
for seed in $SEEDS; do
  ep-train "${COMMON[@]}" --seed "$seed" --signals none --run-dir "$OUT/output_only_seed$seed" \
    > "$OUT/output_only_seed$seed.log" 2>&1 &
  ep-train "${COMMON[@]}" --seed "$seed" --signals classifier --signal-layers auto --signal-pool 2 --lambda 1.0 \
    --run-dir "$OUT/signals_seed$seed" > "$OUT/signals_seed$seed.log" 2>&1 &
  wait
  echo "seed $seed done" >&2
done
python - "$OUT" $SEEDS <<'PY'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, seeds = sys.argv[1], sys.argv[2:]
print(f"deep8 on the digits (360 held out), {', '.join('seed ' + s for s in seeds)}: final / best test accuracy")
fig, ax = plt.subplots(figsize=(6, 4))
for name, color in (("output_only", "tab:gray"), ("signals", "tab:blue")):
    fin, best = [], []
    for i, s in enumerate(seeds):
        m = json.load(open(f"{out}/{name}_seed{s}/metrics.json"))
        fin.append(100 * m["final_test_acc"])
        best.append(100 * m["best_test_acc"])
        acc = [100 * e["test_acc"] for e in m["epochs"]]
        ax.plot(range(1, len(acc) + 1), acc, color=color, alpha=0.8, label=name.replace("_", "-") if i == 0 else None)
    cells = "  ".join(f"{f:5.2f} / {b:5.2f}" for f, b in zip(fin, best))
    print(f"{name:12s} {cells}   mean final {sum(fin) / len(fin):.2f}%")
ax.set_xlabel("epoch")
ax.set_ylabel("test accuracy (%)")
ax.set_title(f"deep8 (8 convs) on the digits, EP, seeds {', '.join(seeds)}")
ax.legend()
fig.tight_layout()
fig.savefig(f"{out}/deep_digits.png", dpi=120)
print(f"wrote {out}/deep_digits.png")
PY
