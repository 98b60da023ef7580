#!/usr/bin/env bash
# Pipeline-parallel throughput of the tiny preset on CPU vs one rank (BENCHMARKS.md); ~3 min on 2 cores.
set -e
cd "$(dirname "$0")/.."
common="train.steps=40 logging.interval=1 logging.console=false checkpoint.save_interval=0"
rm -rf /tmp/bpp
run1() { OMP_NUM_THREADS=2 .venv/bin/dsv3-train $common checkpoint.dir=/tmp/bpp/$1/ckpt ${@:2} >/dev/null 2>&1; }
run2() { OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m megatron_dsv3.train $common checkpoint.dir=/tmp/bpp/$1/ckpt ${@:2} >/dev/null 2>&1; }
run1 r1_mb8
run2 pp2_mb8 parallel.pipeline=2
run1 r1_mb2 train.micro_batch_size=2
run2 pp2_mb2 parallel.pipeline=2 train.micro_batch_size=2
run2 dp2_mb8
for d in r1_mb8 pp2_mb8 r1_mb2 pp2_mb2 dp2_mb8; do
  .venv/bin/python - "$d" <<'PY'
import json, sys, statistics
rs=[json.loads(l) for l in open(f"/tmp/bpp/{sys.argv[1]}/metrics.jsonl")]
rs=[r for r in rs if "tokens_per_s" in r and r["step"]>10]
print(sys.argv[1], round(statistics.median(r["tokens_per_s"] for r in rs)), "final loss", rs[-1]["loss"])
PY
done
