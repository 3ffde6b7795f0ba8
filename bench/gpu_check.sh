#!/usr/bin/env bash
# The single-GPU path of the paper's recipe, proved and measured by one command on a GPU machine: see usage.
set -u
cd "$(dirname "$0")/.."  # the repository root: every path below is relative to it
export PYTHONUNBUFFERED=1

usage() {
  cat <<'EOF'
bash bench/gpu_check.sh [--quick] [--out DIR]

Proves and measures the single-GPU path on a GPU machine, in at most 9 minutes (--quick: 4). Each part runs
under its own time limit, and a part that fails or runs out of time does not stop the others:
  1. the CUDA tests, tests/test_cuda.py: every CUDA-only path against the CPU in the same run (--quick leaves
     out the two --compile tests, whose cold inductor compile takes a minute or more);
  2. bench/gpu_step.py: one training step of the paper's recipe at LLaMA-2-7B's shape and full depth (32 layers,
     random weights, bf16 base, R4, LoRA r=16 on q/v, batch 8 x 1024), without and with --grad-checkpointing:
     tokens/s, MFU against the 790 TFLOP/s bf16 measured on the project's H200, peak memory, beside
     bench/bench_plan.py's prediction of the same step (computed meanwhile on the CPU);
  3. GPTQ of one full-width LLaMA-2-7B block on 128 x 2048 calibration tokens: seconds and peak memory, beside
     the plan's (not with --quick);
  4. the stories260K pipeline on the GPU, train.py --rotate --bits 4, a short run (not with --quick);
  5. part 2 at LLaMA-3-8B's shape, if time is left (not with --quick).
It prints one table (part | result | bench_plan.py predicts) and writes it to DIR/gpu_check.md, each part's
log beside it (DIR: out/gpu_check). The exit status is 1 if a part failed.

Needs: a CUDA GPU with 80 GB or more (the 8B step without checkpointing plans 74 GB), a Python with torch
(2.11 or later), safetensors, sentencepiece, tokenizers, tqdm and pytest (PYTHON=... picks it; default:
python3); no network. Beside the code, these prepared (git-ignored) files, about 6 MB, which only a machine
with the mirror or the network can make:
  data/models/stories260K  data/tinystories  data/wikitext2  data/commonsense
made by: export ROLORA_MIRROR=../shared/assets; python data/models/prepare.py stories260K;
  python data/tinystories/prepare.py; python data/wikitext2/prepare.py; python data/commonsense/prepare.py
With this project's device tool: run(command="bash bench/gpu_check.sh --out $OUT", carry=[the four paths above]).
EOF
}

QUICK=0 DIR=out/gpu_check PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --out) DIR=${2:?gpu_check.sh: --out needs a folder}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device for $PY (torch.cuda.is_available() is False, or no torch): run it on a GPU machine" >&2
  exit 1
fi
missing=""
for f in data/models/stories260K/model.safetensors data/tinystories/train.jsonl data/wikitext2/test.txt \
         data/commonsense/arc_easy.jsonl; do
  [ -f "$f" ] || missing="$missing $f"
done
if [ -n "$missing" ]; then  # the parts that need them fail (or their tests skip); the others run
  echo "gpu_check.sh: missing prepared files:$missing. Carry data/models/stories260K data/tinystories" \
       "data/wikitext2 data/commonsense beside the code (bash bench/gpu_check.sh --help)" >&2
fi

mkdir -p "$DIR"
ROWS=$(mktemp) FAILED=0 BUDGET=$((QUICK ? 235 : 535))

# part NAME CAP COMMAND...: runs COMMAND, its output in DIR/NAME.log, for at most CAP seconds and never past the
# budget; a part that fails gets a FAILED row, with its log's last line, instead of its own rows.
part() {
  local name=$1 cap=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc
  shift 2
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 45 ]; then
    echo "| $name | not run: ${left} s left of the ${BUDGET} s budget | |" >> "$ROWS"
    return 1
  fi
  echo "gpu_check.sh: $name (at most $cap s) ..." >&2
  timeout -k 10 "$cap" "$@" > "$DIR/$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    FAILED=1
    local why="exit status $rc" last
    [ $rc -eq 124 ] && why="stopped at its $cap s limit"
    last=$(grep -v '^[[:space:]]*$' "$DIR/$name.log" | tail -n 1 | tr '|' '/' | cut -c 1-300)
    echo "| $name | FAILED ($why after $((SECONDS - start)) s): ${last:-no output} | log: $DIR/$name.log |" >> "$ROWS"
  fi
  return $rc
}

step() {  # step PART_NAME CAP bench/gpu_step.py's flags...
  local name=$1 cap=$2
  shift 2
  part "$name" "$cap" "$PY" bench/gpu_step.py --rows "$ROWS" "$@"
}

tests=(tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider)
[ $QUICK = 1 ] && tests+=(-k "not compiled")
part cuda_tests $((QUICK ? 130 : 240)) "$PY" -m pytest "${tests[@]}" \
  && echo "| CUDA tests (tests/test_cuda.py) | $(tail -n 1 "$DIR/cuda_tests.log") | |" >> "$ROWS"
step step_llama2-7b 150 --shape llama2-7b
if [ $QUICK = 0 ]; then
  step gptq_llama2-7b 100 --what gptq --shape llama2-7b
  step pipeline_stories260K 100 --what pipeline
  step step_llama3-8b 150 --shape llama3-8b
fi

{
  echo "bench/gpu_check.sh$([ $QUICK = 1 ] && echo " --quick") on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "with torch", torch.__version__)'), $(date -u '+%Y-%m-%d %H:%M UTC'), $SECONDS s"
  echo
  echo "| part | result | bench_plan.py predicts |"
  echo "|---|---|---|"
  cat "$ROWS"
} | tee "$DIR/gpu_check.md"
rm -f "$ROWS"
exit $FAILED
