#!/usr/bin/env bash
# ZeRO-1 (Megatron-Core's DDP + distributed optimizer) vs this project's AdamW, tiny preset on CPU
# (BENCHMARKS.md): tokens/s, Adam moments per rank, loss at step 40; ~2 min on 2 cores.
set -e
cd "$(dirname "$0")/.."
common="train.steps=40 logging.interval=1 logging.console=true checkpoint.save_interval=0"
rm -rf /tmp/bz1
run1() { OMP_NUM_THREADS=2 .venv/bin/dsv3-train $common checkpoint.dir=/tmp/bz1/$1/ckpt ${@:2} >/tmp/bz1_$1.log 2>&1; }
run2() { OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m megatron_dsv3.train $common checkpoint.dir=/tmp/bz1/$1/ckpt ${@:2} >/tmp/bz1_$1.log 2>&1; }
run1 r1_local parallel.distributed_optimizer=false
run1 r1_zero1 parallel.distributed_optimizer=true
run2 dp2_local parallel.distributed_optimizer=false
run2 dp2_zero1 parallel.distributed_optimizer=true
run2 ep2_zero1 parallel.distributed_optimizer=true parallel.expert=2
run2 dp2_local_bf16m parallel.distributed_optimizer=false train.bf16_adam_moments=true
run2 dp2_zero1_bf16m parallel.distributed_optimizer=true train.bf16_adam_moments=true
for d in r1_local r1_zero1 dp2_local dp2_zero1 ep2_zero1 dp2_local_bf16m dp2_zero1_bf16m; do
  .venv/bin/python - "$d" <<'PY'
import json, re, statistics, sys
name = sys.argv[1]
rs = [json.loads(l) for l in open(f"/tmp/bz1/{name}/metrics.jsonl")]
rs = [r for r in rs if "tokens_per_s" in r and r["step"] > 10]
mib = re.search(r"Adam moments ([\d.]+) MiB", open(f"/tmp/bz1_{name}.log").read()).group(1)
print(name, round(statistics.median(r["tokens_per_s"] for r in rs)), "tok/s, Adam", mib, "MiB/rank, loss@40",
      rs[-1]["loss"])
PY
done
