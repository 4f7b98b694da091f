#!/usr/bin/env bash
# The GPU check of issue 6 (item 6), as one short script for a lent device machine:
#   benchmarks/device_check.sh            # on the GPU machine; results under $OUT (else ./device-out)
#   DEVICE=cpu QUICK=1 benchmarks/device_check.sh   # a dry run of the same steps on a CPU
# 1. tests/engine/test_device.py on the device (CPU answers, one host sync per trial step);
# 2. benchmarks/solvers.py, per_sample.py (batch 256 and 16384) and cnf_training.py on the device,
#    side by side with torchdiffeq. Uses the machine's python3 with torch and torchdiffeq (no
#    install: node_engine runs from this checkout). At most 8 minutes (each step has its own
#    time limit), so it fits one device command (10 minutes) with room for the machine's start.
#    (with the compiled_step step, 9.5 minutes: drop a step or run it separately when time is short)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-device-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
dev="${DEVICE:-cuda}"
if [[ -n "${QUICK:-}" ]]; then reps=1 iters=2 big=512 solver_args=(--quick); else reps=5 iters=100 big=16384 solver_args=(); fi
step() {  # name, time limit [s], command...: output to the terminal and to $out/name.txt
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; "$py" -c "import torch, torchdiffeq; print('torch', torch.__version__, \
'torchdiffeq', torchdiffeq.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; } \
  > "$out/env.txt" 2>&1
cat "$out/env.txt"
ODEFORGE_TEST_DEVICE="$dev" step tests 100 "$py" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/engine/test_device.py
step solvers 140 "$py" benchmarks/solvers.py --device "$dev" --reps "$reps" "${solver_args[@]}"
step per_sample 50 "$py" benchmarks/per_sample.py --device "$dev" --reps "$reps"
step per_sample_big 70 "$py" benchmarks/per_sample.py --device "$dev" --reps "$reps" --batch "$big" --ref-samples 256
step cnf_training 120 "$py" benchmarks/cnf_training.py --device "$dev" --iters "$iters" --test 4096 --field-reps 10
# issue 17: the compiled trial step (options["compile"]; on CUDA under CUDA graphs, mode="reduce-overhead"):
# eager vs compiled vs torchdiffeq on MLP / van der Pol joint / per-sample (compile time apart)
step compiled_step 90 "$py" benchmarks/compile.py --step --device "$dev" --reps "$reps"
