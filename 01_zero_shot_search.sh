#!/usr/bin/env bash
# Stage 1 of PreNAS, the zero-shot search: score every subnet of a full search space with the
# proxy and keep the best candidate per interval.
#
# Usage: ./01_zero_shot_search.sh [tiny|small|base|demo] [more search.py arguments]
#
# tiny, small and base use the reference's settings with a data-free gradient at 224x224. Their
# intervals are 1 M wide from 5 to 12 M (tiny), 5 M from 13 to 33 M (small) and 12 M from 30 to
# 70 M (base). demo searches the demo space at 32x32 with the gradient on the digits training set, on
# the CPU. Arguments after the space name are passed on to search.py and override these settings.
#
# Writes OUTPUT_DIR/interval_cands.json (the preferred candidates), OUTPUT_DIR/preferred_space.yaml,
# OUTPUT_DIR/scores.jsonl (every scored candidate) and OUTPUT_DIR/run.log. The released
# candidates in interval_cands/ and experiments/supernet/ stay as they are.
#
# Environment:
#   NPROC       processes (default: the number of visible GPUs, or 1 on the CPU)
#   DEVICE      cuda or cpu (default: cuda when available; cpu for demo)
#   DATA_PATH   dataset folder, passed as --data-path (the data-free spaces do not read it)
#   OUTPUT_DIR  folder for the outputs (default: output/search_<space>; demo: output/demo)
#   PYTHON      Python interpreter (default: python)
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=lib/script_usage.sh
source lib/script_usage.sh
case "${1:-}" in
    -h|--help) print_usage "$(basename "$0")"; exit 0 ;;
esac

SPACE="${1:-tiny}"
if [ $# -gt 0 ]; then
    shift
fi

case "$SPACE" in
    tiny)
        SPACE_ARGS=(--cfg experiments/supernet/supernet-T.yaml --data-free
                    --param-interval 1.0 --min_param_limits 5 --param_limits 12) ;;
    small)
        SPACE_ARGS=(--cfg experiments/supernet/supernet-S.yaml --data-free
                    --param-interval 5.0 --min_param_limits 13 --param_limits 33) ;;
    base)
        SPACE_ARGS=(--cfg experiments/supernet/supernet-B.yaml --data-free
                    --param-interval 12.0 --min_param_limits 30 --param_limits 70) ;;
    demo)
        SPACE_ARGS=(--cfg experiments/supernet/supernet-demo.yaml --data-set DIGITS --grad-batches 8 --aa none
                    --reprob 0 --color-jitter 0 --hflip 0 --crop-padding 0
                    --input-size 32 --patch_size 8 --num_workers 0
                    --param-interval 0.1 --min_param_limits 0.3 --param_limits 0.9) ;;
    *)
        echo "unknown search space '$SPACE'; choose tiny, small, base or demo" >&2
        exit 2 ;;
esac

PYTHON="${PYTHON:-python}"
# shellcheck source=lib/device_defaults.sh
source lib/device_defaults.sh
if [ "$SPACE" = demo ]; then
    # Where 02_one_shot_training.sh demo and 03_evaluation.sh demo look for the candidates.
    OUTPUT_DIR="${OUTPUT_DIR:-output/demo}"
else
    OUTPUT_DIR="${OUTPUT_DIR:-output/search_$SPACE}"
fi
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then
    DATA_ARGS=(--data-path "$DATA_PATH")
fi

# torchrun (python -m torch.distributed.run) with --standalone picks a free port on this machine.
# One process needs no launcher, and an error then ends without torchrun's second traceback.
LAUNCH=("$PYTHON")
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
fi

"${LAUNCH[@]}" search.py \
    --gp --change_qkv --relative_position --dist-eval --batch-size 64 \
    --score-method left_super_taylor6 \
    --block-score-method-for-head balance_taylor6_max_dim \
    --block-score-method-for-mlp balance_taylor6_max_dim \
    --cand-per-interval 1 --device "$DEVICE" \
    --interval-cands-output "$OUTPUT_DIR/interval_cands.json" \
    --choices-output "$OUTPUT_DIR/preferred_space.yaml" \
    --scores-output "$OUTPUT_DIR/scores.jsonl" --output_dir "$OUTPUT_DIR" \
    "${SPACE_ARGS[@]}" "${DATA_ARGS[@]}" "$@"
