#!/usr/bin/env bash
# The benchmarks' arguments: bad ones exit 2 with a message before any work, --help exits 0, a
# --json that cannot be written fails the run, and --gpu/--gbps/--tflops set the ceilings.
# Usage: bench_args.sh BENCH_STEP_FLOOR BENCH_CPU_TRAIN BENCH_GPU_TRAIN
set -u
floor=$1 cpu=$2 gpu=$3
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
fails=0
expect() {  # expect CODE PATTERN COMMAND...: exit status CODE, output matching PATTERN
  local code=$1 pattern=$2; shift 2
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [[ $rc -ne $code ]] || ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL: $* -> exit $rc (expected $code), output:"; echo "$out" | head -5
    fails=$((fails + 1))
  else
    echo "ok: $* -> $rc"
  fi
}
expect 0 '^usage: bench_step_floor' "$floor" --help
expect 2 "unexpected argument 'x'" "$floor" x
expect 2 '--batch needs a value' "$floor" --batch
expect 2 "--gpu 'foo': no datasheet figures" "$floor" --gpu foo
expect 2 "--policies '': expected" "$floor" --policies ''
expect 2 "'fp32' is named twice" "$floor" --policies fp32,fp32
expect 2 "unknown policy 'bogus'" "$floor" --policies bogus
expect 2 "'\+direct' changes no floor" "$floor" --policies bf16+direct
expect 2 "unknown policy 'bf16\+direct'" "$floor" --policies bf16+direct+direct
expect 2 "--policies 'fp32,': expected" "$floor" --policies fp32,
expect 2 "'bf16\+unfused': '\+unfused' applies to fp8 only" "$floor" --policies bf16+unfused
# fp8+unfused's floor is fp8's with the LayerNorms' 16-bit outputs written and read again.
expect 0 'fp8\+unfused ' "$floor" --seq 64 --policies fp8,fp8+unfused --ops fp8+unfused
expect 2 'fp8 products and no rate was given .* on NVIDIA A100' "$floor" --gpu 'NVIDIA A100-SXM4-80GB' --seq 64 --policies fp8
expect 2 '--gbps 0: expected a positive' "$floor" --gbps 0
expect 1 'x.json.tmp: cannot create' "$floor" --seq 64 --policies bf16 --json "$tmp/none/x.json"
# A GPU outside the table, with its figures given: they are the ceilings used.
expect 0 'ceilings \(foo\): 1000 GB/s; TFLOP/s fp32 0.0 tf32 0.0 fp16 0.0 bf16 100.0' \
  "$floor" --gpu foo --gbps 1000 --tflops bf16=100 --seq 64 --policies bf16 --json "$tmp/f.json"
grep -q '"gbps": 1000' "$tmp/f.json" || { echo "FAIL: --json lacks the given --gbps"; fails=$((fails + 1)); }
expect 0 'ceilings \(NVIDIA H100 PCIe\): 2000 GB/s' "$floor" --gpu 'NVIDIA H100 PCIe' --seq 64 --policies bf16

expect 0 '^usage: bench_cpu_train' "$cpu" --help
expect 2 "unknown policy 'bogus'" "$cpu" --policy bogus
expect 2 '--repeats 0: expected a whole number' "$cpu" --repeats 0
expect 2 '--batch -3: expected a whole number' "$cpu" --batch -3
expect 2 '--threads abc: expected a whole number' "$cpu" --threads abc
expect 2 '--recompute 1 needs --policy' "$cpu" --recompute 1
expect 2 '--width 30: expected a multiple' "$cpu" --width 30
expect 2 "unexpected argument 'x'" "$cpu" x

# bench_gpu_train checks its arguments before it looks for a GPU (device time is scarce).
expect 0 '^usage: bench_gpu_train' "$gpu" --help
expect 2 "unknown policy 'bogus'" "$gpu" --policies fp32,bogus
expect 2 "unknown policy 'fp16\+direct'" "$gpu" --policies bf16+recompute+direct,fp16+direct+direct
expect 2 "'fp16\+direct': '\+direct' applies to bf16" "$gpu" --policies bf16+direct,fp16+direct
expect 2 "'tf32\+unfused': '\+unfused' applies to fp8 only" "$gpu" --policies fp8+unfused,tf32+unfused
expect 2 '--batch 0: expected a whole number' "$gpu" --batch 0
expect 2 '--steps x: expected a whole number' "$gpu" --steps x
expect 2 "unexpected argument 'x'" "$gpu" x
echo "bench_args: $fails failed"
[[ $fails -eq 0 ]]
