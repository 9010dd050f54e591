#!/usr/bin/env bash
# The GPU checks and measurements in one run, on a machine with a CUDA device. Parts:
#   device           torch, CUDA and cuDNN versions and the device's name
#   tests            the CUDA tests: no host synchronisation inside a training iteration, GSM on the GPU
#                    against the brute-force selection, the loader on the GPU, gsm_rc56.py --amp --compile
#                    reduce-overhead
#   rc56_throughput  ResNet-56 throughput with GSM against SGD, and the projected time of the whole
#                    1100-epoch experiment for each speed option
#   gsm_step         one GSM step against SGD and a naive GSM (not in the default set)
#   scale            GSM's step against SGD (foreach, fused) at 25M, 100M and 1B weights, eager and compiled
#                    (not in the default set)
#   fsdp2            GSM on a model sharded by FSDP2 on one rank, against SGD and unsharded GSM (not in the
#                    default set)
#
#   bash bench/gpu_checks.sh [OUT_DIR [PART ...]]     (default: gpu_checks, and device tests rc56_throughput)
#
# Each part stops at its own time limit (30, 180, 360, 120, 300 and 120 s), so the default set takes under 10
# minutes.
# Its output goes to the terminal and to OUT_DIR/<part>.log. Works from an installed checkout
# (pip install -r requirements.txt) and from a plain one beside an installed torch, h5py and tqdm (the
# repository root then goes on PYTHONPATH). Exit status 0 when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_checks}"
shift || true
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(device tests rc56_throughput)
for name in "${parts[@]}"; do
    case "$name" in
        device|tests|rc56_throughput|gsm_step|scale|fsdp2) ;;
        *) echo "error: unknown part '$name'; parts: device tests rc56_throughput gsm_step scale fsdp2" >&2
           exit 2 ;;
    esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Checked from another folder: scripts run by path do not have the repository root on sys.path.
(cd / && python -c "import gsm, dataset") 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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

for name in "${parts[@]}"; do
    case "$name" in
        device) part device 30 python -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda, \
'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name())" ;;
        tests) part tests 180 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_optimizer.py -k cuda ;;
        rc56_throughput) part rc56_throughput 360 python bench/bench_rc56_throughput.py --epochs 1 ;;
        gsm_step) part gsm_step 120 python bench/bench_gsm_step.py --device cuda ;;
        scale) part scale 300 bash -c "python bench/bench_scale.py --device cuda --sizes 25e6 1e8 1e9 \
--no-iteration --rounds 5 && python bench/bench_scale.py --device cuda --sizes 25e6 1e8 --ratios 0.1 \
--no-iteration --rounds 5 --gsm-path compiled" ;;
        fsdp2) part fsdp2 120 torchrun --nproc-per-node 1 bench/bench_fsdp2.py --device cuda --size 1e8 ;;
    esac
done
exit $status
