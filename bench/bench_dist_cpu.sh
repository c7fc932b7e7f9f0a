#!/usr/bin/env bash
# Data-parallel throughput on the CPU backend: one process against N ranks under mpirun, on the
# CPU benchmark shape (4 layers, width 256, 4 heads, sequence 64), the same global batch (8
# windows a step) and the same total threads, measured in one run. Prints tokens/s of each, the
# ratio, and the fraction of the N-rank step time spent in the gradient all-reduce (comm_ms);
# then the N ranks again with ZeRO-1 (distributed.zero_stage=1): throughput, communication (the
# all-reduce plus the weight gather) and the predicted optimizer memory per process.
#
#   bench/bench_dist_cpu.sh [RANKS=2] [STEPS=30] [PRECISION=fp32]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mpt="${MPT_BIN:-$root/build/app/mpt}"
n="${1:-2}"
steps="${2:-30}"
precision="${3:-fp32}"
cores=$(nproc)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(train "$root/configs/default.yaml" --set model.n_layer=4 --set model.n_embd=256
        --set model.n_head=4 --set model.max_seq_len=64 --set training.seq_len=64
        --set training.steps="$steps" --set training.log_every="$steps"
        --set training.eval_every=0 --set checkpoint.every=0 --set precision="$precision")
"$mpt" "${common[@]}" --set training.micro_batch=$((8)) --set threads="$cores" \
  --run-dir "$out/one" > /dev/null 2>&1
mpirun --oversubscribe --allow-run-as-root -np "$n" "$mpt" "${common[@]}" \
  --set training.micro_batch=$((8 / n)) --set threads=$((cores / n > 0 ? cores / n : 1)) \
  --run-dir "$out/many" > /dev/null 2>&1
mpirun --oversubscribe --allow-run-as-root -np "$n" "$mpt" "${common[@]}" \
  --set training.micro_batch=$((8 / n)) --set threads=$((cores / n > 0 ? cores / n : 1)) \
  --set distributed.zero_stage=1 --run-dir "$out/zero" > /dev/null 2>&1
python3 - "$out" "$n" "$cores" "$precision" <<'PY'
import json, sys
out, n, cores, precision = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def records(d):
    return [json.loads(l) for l in open(f"{out}/{d}/metrics.jsonl")]
def last_step(d):
    return [r for r in records(d) if "event" not in r][-1]
def optimizer_mib(d):
    m = records(d)[0]["memory"]
    return (m["optimizer_state"] + m["master_weights"]) / 2**20
a, b, z = last_step("one"), last_step("many"), last_step("zero")
print(f"machine: {cores} cores; {precision}; global batch 8 x 64 tokens; steps after the first logged record")
print(f"1 process x {cores} threads: {a['tokens_per_s']:9.0f} tokens/s  step {a['step_ms']:8.1f} ms")
print(f"{n} ranks x {max(cores // n, 1)} threads:    {b['tokens_per_s']:9.0f} tokens/s  step {b['step_ms']:8.1f} ms"
      f"  (all-reduce {b['comm_ms']:.1f} ms = {100 * b['comm_ms'] / b['step_ms']:.1f}% of the step)")
print(f"{n} ranks / 1 process throughput: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
print(f"{n} ranks, ZeRO-1:     {z['tokens_per_s']:9.0f} tokens/s  step {z['step_ms']:8.1f} ms"
      f"  (all-reduce + gather {z['comm_ms']:.1f} ms = {100 * z['comm_ms'] / z['step_ms']:.1f}% of the step)")
print(f"ZeRO-1 / {n} ranks throughput: {z['tokens_per_s'] / b['tokens_per_s']:.2f}x; master + moments per "
      f"process {optimizer_mib('zero'):.1f} MiB vs {optimizer_mib('many'):.1f} MiB "
      f"({optimizer_mib('zero') / optimizer_mib('many'):.2f}x)")
if z["loss"] != b["loss"]:
    sys.exit(f"ZeRO-1 changed the loss: {z['loss']} vs {b['loss']}")
PY
