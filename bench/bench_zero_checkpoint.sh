#!/usr/bin/env bash
# Host memory of a data-parallel job that saves a checkpoint, without and with ZeRO-1: each
# rank's peak resident memory (getrusage of the rank's process) over a short run whose last step
# saves a checkpoint, for distributed.zero_stage 0 and 1 in the same run, and the ratio. The model
# is made large enough (8 layers, width 768: 57M parameters, a 683 MB checkpoint under bf16) that
# the optimizer state dominates what a rank holds.
#
#   bench/bench_zero_checkpoint.sh [RANKS=2] [PRECISION=bf16]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mpt="${MPT_BIN:-$root/build/app/mpt}"
n="${1:-2}"
precision="${2:-bf16}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat > "$out/rss.py" <<'PY'
import os, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(os.environ.get("OMPI_COMM_WORLD_RANK", "0"), f"{peak:.1f}", p.returncode, flush=True)
PY
args=(train "$root/configs/default.yaml" --set model.n_layer=8 --set model.n_embd=768
      --set model.n_head=12 --set model.max_seq_len=64 --set training.micro_batch=1
      --set training.seq_len=64 --set training.steps=2 --set training.eval_every=0
      --set training.eval_batches=1 --set checkpoint.every=0 --set threads=1
      --set precision="$precision")
declare -A peak
for z in 0 1; do
  while read -r rank mib rc; do
    [ "$rc" = 0 ] || { echo "rank $rank failed (exit $rc) with zero_stage=$z" >&2; exit 1; }
    peak[$z,$rank]=$mib
  done < <(mpirun --oversubscribe --allow-run-as-root -np "$n" python3 "$out/rss.py" "$mpt" \
             "${args[@]}" --set distributed.zero_stage=$z --run-dir "$out/zero$z")
done
echo "$n ranks, $precision, peak resident memory per rank (MiB), checkpoint saved at the last step:"
printf "%6s %12s %12s %8s\n" rank zero_stage=0 zero_stage=1 ratio
for ((r = 0; r < n; ++r)); do
  awk -v r="$r" -v a="${peak[0,$r]}" -v b="${peak[1,$r]}" \
    'BEGIN { printf "%6d %12.1f %12.1f %7.2fx\n", r, a, b, b / a }'
done
ls -l "$out/zero1/checkpoints/"step_*/*.safetensors | awk '{ s += $5 } END { printf "checkpoint: %.0f MB\n", s / 1e6 }'
