#!/usr/bin/env bash
# One GPU session's measurements: prepared in session 16 for a lent GPU, first run in session 29 on an H100
# (benchmarks/RESULTS.md, GPU section).
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

export UNIFORM_VIT_CPU_KERNELS=0  # everything timed here runs on the GPU: no need to build the C++ CPU ops

step env 30 bash -c 'nvidia-smi; python3 -c "import torch, timm, triton, sys; print(sys.version); \
print(torch.__version__, torch.version.cuda, timm.__version__, triton.__version__, torch.cuda.get_device_name())"; \
nproc; free -g'
step bench_full 220 "${UV[@]}" bench --device cuda --models full --json "$OUT/res/bench_cuda.json" \
  --csv "$OUT/res/bench_cuda.csv" --plot "$OUT/res/bench_cuda.png"
step kernel_tests 75 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py
if [ "${KERNEL_CONFIGS:-0}" = 1 ]; then  # each block-size candidate of the Triton kernel on its own (diagnostic)
  step kernel_configs 120 python3 benchmarks/scripts/reuse_gpu_kernel.py --tokens 3136 --channels 64,128,256 \
    --batch 32 --json "$OUT/res/reuse_gpu_kernel.json"
fi
step bench_attn 100 "${UV[@]}" bench-attn --device cuda --tokens 196,784,3136,4096 --channels 64,128,256 --rounds 5 \
  --json "$OUT/res/attn_cuda.json" --csv "$OUT/res/attn_cuda.csv" --plot "$OUT/res/attn_cuda.png"

# Fashion-MNIST: the CPU recipe (configs/fashion_mnist.yaml) on the GPU for as many epochs as the time left allows,
# FM_RUNS side by side (IMG:SEED each; default the CPU hour's 112 px with seeds 0 and 1, so the result extends the
# CPU series with more epochs). A one-epoch run of each first measures the pace; the cosine schedule needs the
# epoch count up front, and all runs get the count the slowest allows. FM_EXTRA: more train flags (a smoke test on
# a CPU: FM_EXTRA='--train-samples 1024 --val-samples 512 --workers 0').
FM_RUNS=${FM_RUNS:-112:0 112:1}
DATA=()
[ -d .fmnist ] && DATA=(--data-dir .fmnist)
train() {  # train IMG SEED EPOCHS OUTDIR [FLAG...]: stopped 15 s before the deadline at the latest (partial metrics stay)
  local img=$1 seed=$2 epochs=$3 dir=$4; shift 4
  timeout $(( $(left) - 15 )) "${UV[@]}" train --config configs/fashion_mnist.yaml "${DATA[@]}" --img-size "$img" \
    --seed "$seed" --epochs "$epochs" --workers 6 --val-every 5 --no-progress --output "$dir" ${FM_EXTRA:-} "$@"
}
waitpack() { while [ -n "$(jobs -rp)" ]; do sleep 10; pack; done; wait; }
if [ "$(left)" -gt 90 ]; then
  c0=$(date +%s)
  for r in $FM_RUNS; do train "${r%%:*}" "${r##*:}" 1 "/tmp/cal_${r/:/_s}" --no-aug-epochs 0 > "$OUT/res/cal_${r/:/_s}.log" 2>&1 & done
  waitpack
  per=$(( $(date +%s) - c0 ))  # start-up + one epoch + evaluation of the slowest run, all running
  # the slowest run's epoch (metrics.csv's epoch_seconds): the rest of `per` is start-up and evaluation, paid once
  ep=$(for r in $FM_RUNS; do tail -n 1 "/tmp/cal_${r/:/_s}/metrics.csv" 2>/dev/null | cut -d, -f9; done \
       | sort -g | tail -n 1)
  ep=${ep:-$per}
  avail=$(( $(left) - 25 ))
  epochs=$(python3 -c "print(int(0.9 * max(0, $avail - max(0, $per - $ep)) / max(1.0, $ep)))")
  echo "=== calibration: ${per}s for start-up + one epoch side by side (epoch ${ep}s); ${avail}s left -> $epochs epochs"
  tail -n 3 "$OUT"/res/cal_*.log
  if [ "$epochs" -ge 8 ]; then  # the recipe ends with 6 plain epochs
    for r in $FM_RUNS; do
      t="fm${r/:/_s}"
      train "${r%%:*}" "${r##*:}" "$epochs" "$OUT/res/$t" > "$OUT/res/$t.log" 2>&1 &
    done
    waitpack
    for r in $FM_RUNS; do
      t="fm${r/:/_s}"
      tail -n 4 "$OUT/res/$t.log"
      [ -f "$OUT/res/$t/model_last.safetensors" ] && mv "$OUT/res/$t/model_last.safetensors" "$OUT/$t.safetensors"
      rm -f "$OUT/res/$t/checkpoint.pth" "$OUT/res/$t/model_best.safetensors"
    done
  fi
fi
pack
echo "=== done after $(( $(date +%s) - T0 ))s"
