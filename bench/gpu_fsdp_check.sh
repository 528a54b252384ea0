#!/usr/bin/env bash
# NOT RUN YET: written without a GPU machine (issue 18); nothing in the README may claim its
# results until it has run. The trainer's FSDP2 path on GPUs, through `accelerate launch` with
# launch/fsdp_1node_8gpu.yaml and train.py (bench/gpu_fsdp_check.py), in bf16 and in fp16 (grad
# scaler round trip), `last` saved asynchronously every 5 steps and at each epoch end. For each
# precision: an uninterrupted reference run; a run whose main process is SIGKILLed after step
# 12; its resume with unpickling disabled; the two final `last` checkpoints compared (weights
# bit for bit on the same number of GPUs, the grad scaler's scale, the step). For bf16 also a
# resume of the killed run's checkpoint on one CPU process (reshard N GPUs -> 1 CPU), compared
# within --tolerance.
#
#   bash bench/gpu_fsdp_check.sh                 # every visible GPU (one works: a 1-process FSDP2 mesh)
#   NPROC=2 OUT=/tmp/fsdp-check bash bench/gpu_fsdp_check.sh
#
# Needs a CUDA build of torch in $PYTHON's environment (make venv TORCH=... , see the Makefile).
# Exits non-zero on the first failed check; the JSON lines printed are the results to record.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-$(dirname "$PYTHON")/accelerate}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
OUT=${OUT:-$(mktemp -d -t fsdp-check-XXXXXX)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA: install a CUDA build of torch'; print('torch', torch.__version__, torch.cuda.device_count(), 'GPUs')"

settings=(--config configs/digits.json --quiet --set experiment_options.wandb.mode=disabled
          --set training_options.n_epochs=3 --set training_options.early_stopping=null
          --set training_options.save_every_n_steps=5
          --set 'model_options.kwargs={"hidden_dims": [2048, 2048], "dropout": 0.0}')
launch() {  # precision, run root, then more train.py arguments
  local precision=$1 root=$2; shift 2
  "$ACCELERATE" launch --config_file launch/fsdp_1node_8gpu.yaml --num_processes "$NPROC" --mixed_precision "$precision" \
    bench/gpu_fsdp_check.py "${settings[@]}" --set training_options.mixed_precision="$precision" \
    --set experiment_options.ckpt_dir="$root" "$@"
}

for precision in bf16 fp16; do
  ref="$OUT/$precision/reference" run="$OUT/$precision/killed"
  echo "== $precision: reference, $NPROC processes"
  launch "$precision" "$ref" > "$ref.log" 2>&1 || { tail -50 "$ref.log"; exit 1; }
  echo "== $precision: SIGKILL of the main process after step 12"
  if GPU_CHECK_KILL_AT_STEP=12 launch "$precision" "$run" > "$run-kill.log" 2>&1; then
    echo "the killed run exited 0: its SIGKILL did not happen" >&2; exit 1
  fi
  cp -r "$run" "$run-copy"  # for the CPU resume below
  echo "== $precision: resume, unpickling disabled"
  GPU_CHECK_FORBID_UNPICKLING=1 launch "$precision" "$run" --set experiment_options.resume=true > "$run-resume.log" 2>&1 \
    || { tail -50 "$run-resume.log"; exit 1; }
  grep "resume: continuing from" "$run-resume.log"
  "$PYTHON" bench/gpu_fsdp_check.py --compare "$ref/digits-mlp/last" "$run/digits-mlp/last"
  if [ "$precision" = bf16 ]; then
    echo "== bf16: the killed run's GPU checkpoint resumed on one CPU process (the same global batch)"
    CUDA_VISIBLE_DEVICES= GPU_CHECK_FORBID_UNPICKLING=1 "$PYTHON" bench/gpu_fsdp_check.py "${settings[@]}" \
      --set training_options.mixed_precision=bf16 --set experiment_options.ckpt_dir="$run-copy" \
      --set dataset_options.batch_size=$((64 * NPROC)) --set experiment_options.resume=true > "$run-cpu.log" 2>&1 \
      || { tail -50 "$run-cpu.log"; exit 1; }
    grep "resume: continuing from" "$run-cpu.log"
    # GPU and CPU bf16 kernels round differently: the record is how far apart, not bit for bit.
    "$PYTHON" bench/gpu_fsdp_check.py --compare "$ref/digits-mlp/last" "$run-copy/digits-mlp/last" --tolerance 0.1
  fi
done
echo "all checks passed; logs and checkpoints under $OUT"
