#!/usr/bin/env bash
# The real-weights model's end-to-end checks (issue [1/7]'s acceptance), as a new user runs them:
#
#   bash benchmarks/real_model_checks.sh [OUT]      (default runs/real-checks; ~15 minutes on 2 cores)
#
# builds the model offline from the two installed packages; `mquant verify` with every
# function-preserving transform (logits <= 1e-4 relative, identical generations, or exit status 1);
# quantizes it with every preset (8 calibration samples of its tasks' calib split: this checks that
# each preset runs, not how well); exports mquant-w4a8 and gptq-w4a8-dynamic to compressed-tensors and
# scores the exports reloaded by plain transformers; answers one question on the fake-quant and
# cpu-int8 backends. Stops at the first failure.
set -euo pipefail
MQUANT=${MQUANT:-.venv/bin/mquant}
OUT=${1:-runs/real-checks}
TASKS=digits,yesno,choice,compare
mkdir -p "$OUT"
log() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

log "build"
MODEL=$("$MQUANT" zoo build real | sed -n 's/^the real model is in //p')
echo "model: $MODEL"

log "verify: ln2rn,rotate,online_hadamard,rms,aifs"
"$MQUANT" verify "$MODEL" --transforms ln2rn,rotate,online_hadamard,rms,aifs --samples "builtin:$TASKS" --out "$OUT/verify.json"

for recipe in $("$MQUANT" recipes | awk '{print $1}'); do
  log "quantize $recipe"
  "$MQUANT" quantize "$MODEL" --recipe "$recipe" --calib "builtin:$TASKS" --num-calib 8 --out "$OUT/q/$recipe"
done

for pair in mquant-w4a8:w8a8-static gptq-w4a8-dynamic:w4a8-dynamic; do
  recipe=${pair%%:*} scheme=${pair##*:}
  log "export $recipe as compressed-tensors $scheme, reloaded by transformers"
  "$MQUANT" export "$OUT/q/$recipe" --scheme "$scheme" --out "$OUT/ct/$recipe" --eval-limit 16 --eval-tasks "$TASKS"
done

IMAGE=$(.venv/bin/python - <<'EOF'
from mquant.zoo import benchmark
sample = benchmark.generate("digits", "test", 1)[0]
sample.images[0].save("/tmp/mquant-real-check-digit.png")
print("/tmp/mquant-real-check-digit.png", sample.text.replace("<image>", "").strip(), sample.answers[0], sep="\t")
EOF
)
IFS=$'\t' read -r IMAGE_PATH QUESTION ANSWER <<<"$IMAGE"
for backend in fake cpu-int8; do
  log "generate on $backend (the digit is $ANSWER)"
  "$MQUANT" generate "$OUT/q/mquant-w4a8" --backend "$backend" --image "$IMAGE_PATH" --prompt "$QUESTION"
done
log "all checks passed"
