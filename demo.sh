#!/usr/bin/env bash
# The whole PreNAS pipeline on the embedded digits dataset, on the CPU:
#
#   1. build the digits dataset if it is missing (scikit-learn's 8x8 digits as 32x32 PNG files);
#   2. zero-shot search of the demo space (01_zero_shot_search.sh demo);
#   3. preferred one-shot training of the demo supernet (02_one_shot_training.sh demo);
#   4. search-free evaluation of every preferred candidate (03_evaluation.sh demo);
#
# then print the table of the preferred subnets and where the outputs are.
#
# Usage: bash demo.sh   (no arguments; -h or --help prints this text)
#
# Outputs, under OUTPUT_DIR (default output/demo):
#   interval_cands.json, scores.jsonl, preferred_space.yaml, run.log   the search
#   train/  checkpoint.pth, log.txt, config.yaml, tb/                  the training
#   eval/   results.json, pareto.png, proxy_correlation.json, subnets/ the evaluation
# A new run first deletes these outputs of an earlier run in the same OUTPUT_DIR.
#
# Environment:
#   OUTPUT_DIR    folder for all outputs (default output/demo; a relative path starts at the
#                 repository root, because the script runs from there)
#   PRENAS_CACHE  cache folder of the digits dataset (default ~/.cache/prenas)
#   DATA_PATH     a digits folder to use instead of the cache (built there if missing)
#   PYTHON        Python interpreter (default python)
#   OMP_NUM_THREADS  CPU threads per process (default 1)
#   SEARCH_ARGS, TRAIN_ARGS, EVAL_ARGS
#                 extra arguments for search.py, train.py and evaluate.py, split on spaces; they
#                 override the demo settings (for example TRAIN_ARGS="--epochs 2")
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=lib/script_usage.sh
source lib/script_usage.sh
if [ $# -gt 0 ]; then
    case "$1" in
        -h|--help) print_usage demo.sh; exit 0 ;;
    esac
    # Checked before anything is deleted: a mistyped argument must not cost the earlier outputs.
    echo "demo.sh takes no arguments, got: $*. Set OUTPUT_DIR, SEARCH_ARGS, TRAIN_ARGS or EVAL_ARGS instead (see bash demo.sh --help)" >&2
    exit 2
fi

OUTPUT_DIR="${OUTPUT_DIR:-output/demo}"
PYTHON="${PYTHON:-python}"
export PYTHON
# The demo's matrices are small, so one thread per process is the default. On a 2-core machine
# shared with other jobs, two epochs of demo training took 8 s on one thread and 37 s on two.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
read -r -a SEARCH_EXTRA <<< "${SEARCH_ARGS:-}"
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"

if [ -z "$OUTPUT_DIR" ]; then
    echo "OUTPUT_DIR is set but empty; unset it to use output/demo, or set it to a folder" >&2
    exit 2
fi

# Stale files of an earlier run (for example exported subnets of other intervals) would mix with
# the new ones, so the demo starts from an empty set of outputs.
if [ -d "$OUTPUT_DIR" ]; then
    echo "demo: deleting the outputs of an earlier run in $OUTPUT_DIR"
    rm -rf "$OUTPUT_DIR/train" "$OUTPUT_DIR/eval"
    rm -f "$OUTPUT_DIR/interval_cands.json" "$OUTPUT_DIR/scores.jsonl" \
          "$OUTPUT_DIR/preferred_space.yaml" "$OUTPUT_DIR/run.log"
fi
mkdir -p "$OUTPUT_DIR"

STARTED=$SECONDS
stage_done() {
    echo "demo: $1 finished after $((SECONDS - STARTED)) s in total"
    echo
}

echo "demo: [1/4] digits dataset"
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then
    DATA_ARGS=(--data-path "$DATA_PATH")
fi
"$PYTHON" -m lib.datasets --build-digits "${DATA_ARGS[@]}"
stage_done "dataset"

echo "demo: [2/4] zero-shot search of experiments/supernet/supernet-demo.yaml"
OUTPUT_DIR="$OUTPUT_DIR" \
    bash 01_zero_shot_search.sh demo "${SEARCH_EXTRA[@]}"
stage_done "search"

echo "demo: [3/4] preferred one-shot training of the demo supernet"
CANDFILE="$OUTPUT_DIR/interval_cands.json" OUTPUT_DIR="$OUTPUT_DIR/train" \
    bash 02_one_shot_training.sh demo "${TRAIN_EXTRA[@]}"
stage_done "training"

echo "demo: [4/4] search-free evaluation of the preferred subnets"
CKPT="$OUTPUT_DIR/train/checkpoint.pth" CANDFILE="$OUTPUT_DIR/interval_cands.json" \
    SCORES="$OUTPUT_DIR/scores.jsonl" OUTPUT_DIR="$OUTPUT_DIR/eval" \
    bash 03_evaluation.sh demo "${EVAL_EXTRA[@]}"
stage_done "evaluation"

"$PYTHON" - "$OUTPUT_DIR" "$((SECONDS - STARTED))" <<'PYTHON_SUMMARY'
import json
import sys
from pathlib import Path

from lib.results import format_table, load_results

output_dir = Path(sys.argv[1]).absolute()
elapsed = int(sys.argv[2])
eval_dir = output_dir / "eval"
results = load_results(eval_dir / "results.json")
correlation_file = eval_dir / "proxy_correlation.json"
correlation = json.loads(correlation_file.read_text()) if correlation_file.is_file() else None

best = max(results, key=lambda result: result["acc1"])
worst = min(results, key=lambda result: result["acc1"])
print(f"PreNAS demo: {len(results)} preferred subnets of the demo supernet, digits validation split")
print(format_table(results, correlation))
print()
print(f"best top-1 {best['acc1']:.2f} % (interval {best['interval']}), lowest top-1 {worst['acc1']:.2f} % "
      f"(interval {worst['interval']})")
print(f"Pareto plot:       {eval_dir / 'pareto.png'}")
print(f"exported subnets:  {eval_dir / 'subnets'}")
print(f"results:           {eval_dir / 'results.json'}")
print(f"supernet:          {output_dir / 'train' / 'checkpoint.pth'}")
print(f"demo finished in {elapsed // 60} min {elapsed % 60} s; all outputs are in {output_dir}")
PYTHON_SUMMARY
