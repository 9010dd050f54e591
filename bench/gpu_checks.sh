#!/usr/bin/env bash
# Every GPU check and measurement in one run, on a machine with a CUDA device: the CUDA tests (no host
# synchronisation inside a training iteration, GSM on the GPU against the brute-force selection, the
# ResNet script with --amp --compile), ResNet-56 throughput with GSM against SGD and the projected time of
# the whole 1100-epoch experiment for each speed option, and the time of one GSM step against SGD and a
# naive GSM. Each part is cut at its own time limit; its output goes to the terminal and to OUT_DIR/<part>.log.
#
#   bash bench/gpu_checks.sh [OUT_DIR]        (default OUT_DIR: gpu_checks)
#
# Each part stops at its own time limit (below), 14 minutes in all at most. Works from an installed checkout (pip install -r requirements.txt)
# and from a plain one beside an installed torch, h5py and tqdm (the repository root then goes on PYTHONPATH).
# Exit status 0 when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import gsm" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA device is visible to torch; these checks need one" >&2
    exit 1
fi

status=0
part() {  # part NAME SECONDS COMMAND...: run COMMAND, cut after SECONDS, log to OUT_DIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name: $*" | tee "$out/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit status $rc after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

part device 60 python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cudnn.version())"
part tests 240 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_optimizer.py -k cuda
part rc56_throughput 420 python bench/bench_rc56_throughput.py --epochs 1
part gsm_step 120 python bench/bench_gsm_step.py --device cuda
exit $status
