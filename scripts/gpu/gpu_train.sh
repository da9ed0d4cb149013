#!/usr/bin/env bash
# One bounded GPU call of diffusion training: a short benchmark (bare optimiser step against the
# whole step with the batched link), then training that stops in time and writes its fp16 weights
# as parts of at most 16 MiB to $OUT/parts, plus the log and the last sample grid.
#
#   OUT=<folder that comes back> scripts/gpu/gpu_train.sh [more train_diffusion flags]
#
# Environment (defaults in brackets):
#   PRESET        large96 (96x128, 64 ch, mult 1,2,3,4, 2 res blocks, batch 64, ~27 M params) | tiny
#   BUDGET_S      seconds for the training process, loading and saving included [450]
#   BENCH_STEPS   steps per benchmark phase, 0 skips it [20]
#   DATA          data archive or folder [data-archive/camvid-96x128.tar]
#   RESUME_PARTS  parts folder of an earlier call to continue from (re-warms the learning rate) []
#   PARTS_INCLUDE ema | model,ema [ema: 27.0 M params in fp16 are 51.6 MiB (4 parts); model and EMA would not fit
#                 the 64 MiB that one call hands back]
#   RUN_DIR       out_dir on the machine; state.pt there resumes exactly while it lives [runs/gpu-$PRESET]
#   PYTHON        [python3]   DEVICE [cuda]
# Make the archive first (here): python -m scripts.gpu.make_data_archive --size 96x128
set -euo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
PRESET=${PRESET:-large96}
BUDGET_S=${BUDGET_S:-450}
BENCH_STEPS=${BENCH_STEPS:-20}
DATA=${DATA:-data-archive/camvid-96x128.tar}
PARTS_INCLUDE=${PARTS_INCLUDE:-ema}
RUN_DIR=${RUN_DIR:-runs/gpu-$PRESET}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1

case "$PRESET" in
  large96) MODEL=(--model-name gesco-camvid-96x128 --image-height 96 --image-width 128 --model-channels 64
                  --channel-mult 1,2,3,4 --num-res-blocks 2 --batch-size 64 --lr 2e-4
                  --warmup-steps 500 --ema-decay 0.999 --eval-every 500 --sample-every 2000 --log-every 100) ;;
  tiny) MODEL=(--model-name tiny --image-height 48 --image-width 64 --model-channels 8 --spade-hidden 8
               --batch-size 4 --eval-every 4 --sample-every 8 --log-every 2 --threads 1) ;;
  *) echo "unknown PRESET $PRESET" >&2; exit 2 ;;
esac
COMMON=(--data-root "$DATA" --out-dir "$RUN_DIR" --export-path "$RUN_DIR/export.pt" --device "$DEVICE" "${MODEL[@]}")
[ -n "${RESUME_PARTS:-}" ] && COMMON+=(--resume-parts "$RESUME_PARTS")
mkdir -p "$OUT/parts" "$RUN_DIR"
LOG="$OUT/train.log"

if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"; fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$LOG"

if [ "$BENCH_STEPS" -gt 0 ]; then
  # its own out_dir: the benchmark changes weights and must not touch the run's state
  "$PYTHON" -m training.train_diffusion "${COMMON[@]}" --out-dir "$RUN_DIR-bench" --export-path "$RUN_DIR-bench/x.pt" \
      --resume-parts "" --benchmark-steps "$BENCH_STEPS" "$@" 2>&1 | grep -E '"benchmark"|Error|error' | tee -a "$LOG"
fi

started=$(date +%s)
"$PYTHON" -m training.train_diffusion "${COMMON[@]}" --time-budget-s "$BUDGET_S" --save-parts "$OUT/parts" \
    --parts-include "$PARTS_INCLUDE" "$@" 2>&1 | tee -a "$LOG" | grep -E '"event"|Error|error' || true
echo "training process: $(( $(date +%s) - started )) s" | tee -a "$LOG"
cp "$RUN_DIR/log.jsonl" "$OUT/log.jsonl"
last=$(ls "$RUN_DIR"/samples/*.png 2>/dev/null | tail -1 || true)
[ -n "$last" ] && cp "$last" "$OUT/"
ls -l "$OUT" "$OUT/parts" | tee -a "$LOG"
