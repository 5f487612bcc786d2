#!/usr/bin/env bash
# Stage 3 of PreNAS, search-free evaluation: every preferred candidate inherits the weights of
# the trained supernet and is evaluated on the validation set, with no search after training.
#
# Usage: ./03_evaluation.sh [tiny|small|base|demo] [more evaluate.py arguments]
#
# tiny, small and base evaluate the candidates of interval_cands/<space>.json (the released
# ones) on ImageNet at 224x224, with the released checkpoint checkpoints/supernet-<space>.pth if
# it exists, else with output/<space>/checkpoint.pth of ./02_one_shot_training.sh <space>. demo evaluates the demo supernet that ./02_one_shot_training.sh demo
# trained, on the digits validation set at 32x32 on the CPU, exports every candidate as a
# standalone subnet and correlates the search's proxy scores with the measured accuracy.
# Arguments after the space name are passed on to evaluate.py and override these settings. With
# --subnet JSON among them, that one subnet is evaluated instead of the candidates file.
#
# Writes OUTPUT_DIR/results.json, OUTPUT_DIR/pareto.png and OUTPUT_DIR/run.log, and for demo
# also OUTPUT_DIR/proxy_correlation.json and OUTPUT_DIR/subnets/.
#
# Environment:
#   CKPT        supernet checkpoint (default: checkpoints/supernet-<space>.pth, else
#               output/<space>/checkpoint.pth; demo: output/demo/train/checkpoint.pth)
#   NPROC       processes (default: the number of visible GPUs, or 1 on the CPU)
#   DEVICE      cuda or cpu (default: cuda when available; cpu for demo)
#   DATA_PATH   ImageNet folder with train/ and val/ (default: ../datas/imagenet); for demo the
#               digits folder (default: the digits cache)
#   CFG         search-space YAML whose SUPERNET matches the checkpoint (default: the preferred
#               space experiments/supernet/<space>.yaml; a base checkpoint with 16 blocks needs
#               experiments/supernet/supernet-B.yaml)
#   CANDFILE    interval-candidates JSON (default: interval_cands/<space>.json;
#               demo: output/demo/interval_cands.json)
#   SCORES      demo only: proxy scores of the search (default: output/demo/scores.jsonl)
#   OUTPUT_DIR  output folder (default: output/<space>/eval)
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

RELEASE_URL="https://idstcv.oss-cn-zhangjiakou.aliyuncs.com/PreNAS"
case "$SPACE" in
    tiny|small|base)
        if [ -z "${CKPT:-}" ]; then
            CKPT="checkpoints/supernet-$SPACE.pth"
            if [ ! -f "$CKPT" ] && [ -f "output/$SPACE/checkpoint.pth" ]; then
                CKPT="output/$SPACE/checkpoint.pth"
            fi
        fi
        CFG="${CFG:-experiments/supernet/$SPACE.yaml}"
        CANDFILE="${CANDFILE:-interval_cands/$SPACE.json}"
        SPACE_ARGS=(--data-set IMNET --data-path "${DATA_PATH:-../datas/imagenet}" --input-size 224
                    --patch_size 16 --batch-size 128) ;;
    demo)
        CKPT="${CKPT:-output/demo/train/checkpoint.pth}"
        CFG="${CFG:-experiments/supernet/supernet-demo.yaml}"
        CANDFILE="${CANDFILE:-output/demo/interval_cands.json}"
        SCORES="${SCORES:-output/demo/scores.jsonl}"
        OUTPUT_DIR="${OUTPUT_DIR:-output/demo/eval}"
        SPACE_ARGS=(--data-set DIGITS --input-size 32 --patch_size 8 --batch-size 256 --num_workers 0
                    --export-dir "$OUTPUT_DIR/subnets")
        if [ -n "${DATA_PATH:-}" ]; then
            SPACE_ARGS+=(--data-path "$DATA_PATH")
        fi
        if [ -f "$SCORES" ]; then
            SPACE_ARGS+=(--scores "$SCORES")
        else
            echo "no proxy scores at $SCORES; evaluating without the proxy correlation" >&2
        fi ;;
    *)
        echo "unknown space '$SPACE'; choose tiny, small, base or demo" >&2
        exit 2 ;;
esac

if [ ! -f "$CKPT" ]; then
    echo "checkpoint $CKPT not found." >&2
    if [ "$SPACE" = demo ]; then
        echo "Train the demo supernet first with ./02_one_shot_training.sh demo, or set CKPT." >&2
    else
        echo "Download the released supernet from $RELEASE_URL/supernet-$SPACE.pth into checkpoints/," >&2
        echo "or train one with ./02_one_shot_training.sh $SPACE (output/$SPACE/checkpoint.pth), or set CKPT." >&2
    fi
    exit 1
fi
# A --subnet among the extra arguments evaluates that one subnet instead of the candidates file.
CANDIDATE_ARGS=(--candfile "$CANDFILE")
for argument in "$@"; do
    if [ "$argument" = --subnet ] || [[ "$argument" == --subnet=* ]]; then
        CANDIDATE_ARGS=()
    fi
done
if [ "${#CANDIDATE_ARGS[@]}" -gt 0 ] && [ ! -f "$CANDFILE" ]; then
    echo "candidates file $CANDFILE not found; run ./01_zero_shot_search.sh $SPACE first, or set CANDFILE." >&2
    exit 1
fi

PYTHON="${PYTHON:-python}"
# shellcheck source=lib/device_defaults.sh
source lib/device_defaults.sh
OUTPUT_DIR="${OUTPUT_DIR:-output/$SPACE/eval}"

# torchrun (python -m torch.distributed.run) with --standalone picks a free port on this machine.
LAUNCH=("$PYTHON")
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
fi

"${LAUNCH[@]}" evaluate.py \
    --gp --change_qkv --relative_position --mode retrain --eval --dist-eval \
    --cfg "$CFG" "${CANDIDATE_ARGS[@]}" --resume "$CKPT" --device "$DEVICE" \
    --output_dir "$OUTPUT_DIR" \
    "${SPACE_ARGS[@]}" "$@"
