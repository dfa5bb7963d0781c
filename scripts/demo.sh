#!/usr/bin/env bash
# The built-in demo: pretrain a small diffusion model on the 2-D swiss roll (EDM loss), tune it into a
# consistency model with ECT, and sample it with 1 and 2 steps beside the teacher's 35-NFE Heun
# samples. A few minutes on 2 CPU cores. Outputs under runs/demo-toy2d/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
E=.venv/bin/ectune
OUT=runs/demo-toy2d
mkdir -p "$OUT"
[ -f "$OUT/teacher/model/config.json" ] || $E pretrain --preset toy2d --run-dir "$OUT/teacher"
[ -f "$OUT/ecm/model/config.json" ] || $E tune --preset toy2d --teacher "$OUT/teacher" --run-dir "$OUT/ecm"
for s in 1 2; do
  [ -f "$OUT/ecm-${s}step.png" ] || $E sample "$OUT/ecm" --steps "$s" --num_images 4000 --out "$OUT/ecm-${s}step.png"
done
[ -f "$OUT/teacher-heun35.png" ] || $E sample "$OUT/teacher" --num_images 4000 --out "$OUT/teacher-heun35.png"
echo "done: teacher (35 NFE) and ECM (1 and 2 NFE) samples in $OUT/*.png; training logs in $OUT/*/log.txt"
