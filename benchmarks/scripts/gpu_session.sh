#!/usr/bin/env bash
# One GPU session's measurements, as run on a lent NVIDIA H200 (session 16; benchmarks/RESULTS.md, GPU section).
# Each step has its own time limit, so one failure leaves the others' results; everything lands in $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/scripts/gpu_session.sh            (from the repository root, on a CUDA machine)
#
# Optional: .whl/*.whl are installed first (a pinned timm where the machine has another), .fmnist/ holds the four
# Fashion-MNIST idx files where no Debian package or download is available. DEADLINE_S (default 560) is the
# wall-clock budget of the whole script; the training runs get what the benchmarks leave of it. Both folders are in
# .gitignore; to send the script to this workplace's lent GPU (the `device` tool), prepare them here and carry them:
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/
#   pip download -q --no-deps --only-binary=:all: -d .whl timm==1.0.31
#   run: 'set -o pipefail; DEADLINE_S=555 bash benchmarks/scripts/gpu_session.sh 2>&1 | tee $OUT/log.txt',
#        carry ['.whl', '.fmnist'], timeout_s 600
set -u
OUT=${OUT:?set OUT to a results folder}
mkdir -p "$OUT/res"
T0=$(date +%s)
DEADLINE_S=${DEADLINE_S:-560}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
UV=(python3 -m uniform_vit.cli.main)
pack() { tar -czf "$OUT/results.tgz" -C "$OUT" res 2>/dev/null; }
left() { echo $((DEADLINE_S - ($(date +%s) - T0))); }
step() {  # step NAME SECONDS command...: run with a limit, log it, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, $(left)s left) $(date -u +%H:%M:%S)"
  timeout "$limit" "$@" > "$OUT/res/$name.log" 2>&1
  echo "=== $name: rc=$? after $(( $(date +%s) - T0 ))s"
  tail -n 40 "$OUT/res/$name.log"
  pack
}

step env 60 bash -c 'nvidia-smi; python3 -c "import torch, timm, triton, sys; print(sys.version); \
print(torch.__version__, torch.version.cuda, timm.__version__, triton.__version__, torch.cuda.get_device_name())"; \
nproc; free -g'
step bench_full 240 "${UV[@]}" bench --device cuda --models full --json "$OUT/res/bench_cuda.json" \
  --csv "$OUT/res/bench_cuda.csv" --plot "$OUT/res/bench_cuda.png"
step kernel_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py
step kernel_configs 120 python3 benchmarks/scripts/reuse_gpu_kernel.py --tokens 3136 --channels 64,128,256 \
  --batch 32 --json "$OUT/res/reuse_gpu_kernel.json"
step bench_attn 170 "${UV[@]}" bench-attn --device cuda --tokens 49,196,784,3136,4096 --channels 64,128,256 --rounds 5 \
  --json "$OUT/res/attn_cuda.json" --csv "$OUT/res/attn_cuda.csv" --plot "$OUT/res/attn_cuda.png"

# Fashion-MNIST: the CPU recipe (configs/fashion_mnist.yaml) at 112 px, and at 224 px (14x14 tokens after the 16x
# stem instead of 7x7), side by side on the one GPU, as many epochs as the time left allows (a one-epoch run of each
# first measures the pace; the cosine schedule needs the epoch count up front).
DATA=()
[ -d .fmnist ] && DATA=(--data-dir .fmnist)
train() {  # train TAG IMG EPOCHS OUTDIR: stopped 15 s before the deadline at the latest (partial metrics stay)
  timeout $(( $(left) - 15 )) "${UV[@]}" train --config configs/fashion_mnist.yaml "${DATA[@]}" --img-size "$2" \
    --epochs "$3" --workers 7 --val-every 5 --no-progress --output "$4"
}
waitpack() { while [ -n "$(jobs -rp)" ]; do sleep 15; pack; done; wait; }
if [ "$(left)" -gt 90 ]; then
  c0=$(date +%s)
  train cal112 112 1 /tmp/cal112 > "$OUT/res/cal112.log" 2>&1 &
  train cal224 224 1 /tmp/cal224 > "$OUT/res/cal224.log" 2>&1 &
  waitpack
  per=$(( $(date +%s) - c0 ))  # one epoch + evaluation + start-up of the slower run, both running
  avail=$(( $(left) - 25 ))
  epochs=$(( avail / (per > 1 ? per : 1) ))
  echo "=== calibration: ${per}s for one epoch of both runs side by side; ${avail}s left -> $epochs epochs"
  tail -n 3 "$OUT/res/cal112.log" "$OUT/res/cal224.log"
  if [ "$epochs" -ge 3 ]; then
    train fm112 112 "$epochs" "$OUT/res/fm112" > "$OUT/res/fm112.log" 2>&1 &
    train fm224 224 "$epochs" "$OUT/res/fm224" > "$OUT/res/fm224.log" 2>&1 &
    waitpack
    tail -n 4 "$OUT/res/fm112.log" "$OUT/res/fm224.log"
    for t in fm112 fm224; do
      [ -f "$OUT/res/$t/model_last.safetensors" ] && mv "$OUT/res/$t/model_last.safetensors" "$OUT/$t.safetensors"
      rm -f "$OUT/res/$t/checkpoint.pth" "$OUT/res/$t/model_best.safetensors"
    done
  fi
fi
pack
echo "=== done after $(( $(date +%s) - T0 ))s"
