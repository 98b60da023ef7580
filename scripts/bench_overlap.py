"""What cutting a stage into pieces costs where nothing can overlap (CPU, gloo): two micro-batches'
forward and backward on two expert-parallel ranks, plain (F0, F1, one backward) against DualPipe's
overlapped step (F0; F1 interleaved with B0 piece by piece; B1), median of --repeats, ratio in the
same run. On a GPU the same pieces put the all-to-alls on their own stream; here the ratio is the
price of the cuts (a view and an autograd call per piece), what the overlap must win back. Also:
the same backwards split into B and deferred W (DualPipe's cool-down), and the activation bytes
kept after one forward, plain and cut. Wall time and, less sensitive to a loaded machine, rank 0's
CPU time. And the same model as a last pipeline stage, each micro-batch's backward whole or split
into B and W, W from the weight-gradient store or walking the graph B retained (the store's cost
against what DualPipe ran before it).

    .venv/bin/python scripts/bench_overlap.py --preset tiny --repeats 7
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_dsv3 import DSV3Config, build_model
    from megatron_dsv3.parallel import initialize_parallel
    from megatron_dsv3.pipeline.overlap import Segmented, Streams, run_chain, run_pair
    from megatron_dsv3.pipeline.pieces import stage_pieces
    from megatron_dsv3.weight_grad_store import WeightGradStore

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    initialize_parallel(1, 1, 2)
    torch.set_num_threads(1)
    config = DSV3Config.preset(args.preset, mtp_num_modules=1)
    model = build_model(config, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(dist.get_rank())
    data = [torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(2)]
    data = [(d[:, :-1], d[:, 1:]) for d in data]
    cpu = Streams(torch.device("cpu"))

    def plain() -> None:
        sum(model(t, labels=l).loss for t, l in data).backward()

    def cut_passes():
        passes, outputs = [Segmented(stage_pieces(model, t, labels=l), cpu) for t, l in data], {}

        def forward(i):
            return passes[i].forward_steps(lambda: None, lambda out: outputs.__setitem__(i, out))

        def backward(i, split=False):
            return passes[i].backward_steps(lambda: (outputs[i].loss, None), params, split, lambda: None)

        return passes, forward, backward

    def overlapped() -> None:
        _, forward, backward = cut_passes()
        run_chain(forward(0), cpu)
        run_pair(forward(1), backward(0), cpu)
        run_chain(backward(1), cpu)

    def split() -> None:  # every backward as B, then its deferred W (DualPipe's cool-down ops)
        passes, forward, backward = cut_passes()
        run_chain(forward(0), cpu)
        run_chain(forward(1), cpu)
        for i in (0, 1):
            run_chain(backward(i, split=True), cpu)
            passes[i].weight_grad()

    # The same model as a last pipeline stage (its input a received hidden state), one backward per
    # micro-batch: whole, or split into B (the input's gradient) and W, W either from the store of
    # deferred GEMMs (what DualPipe runs) or by walking the graph B retained (what it ran before).
    last = build_model(config, seed=1, stages=(1,), num_stages=2)
    last_params = [p for p in last.parameters() if p.requires_grad]
    hidden = [torch.randn(args.batch, args.seq, config.hidden_size, generator=g) for _ in range(2)]

    def last_stage(mode: str) -> None:
        for (tokens, labels), h in zip(data, hidden):
            last.input_hidden = x = h.clone().requires_grad_()
            loss = last(tokens, labels=labels, stage=1).loss
            if mode == "whole":
                loss.backward()
            elif mode == "store":
                store = WeightGradStore()
                with store.collecting():
                    loss.backward()
                store.flush()
            else:
                torch.autograd.grad(loss, x, retain_graph=True)
                torch.autograd.backward(loss, inputs=last_params)

    # Activation memory after one forward: what autograd saved plus what is still referenced (the
    # output; the pieces' state, which the cut pass clears), distinct storages, parameters excluded.
    params_at = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def bytes_of(tensors) -> dict[int, int]:
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if t.untyped_storage().data_ptr() not in params_at}

    def kept_after(forward) -> int:
        saved: list = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            held = forward()
        return sum((bytes_of(saved) | bytes_of(held)).values())

    def cut_forward() -> list:
        segmented, output = Segmented(stage_pieces(model, data[0][0], labels=data[0][1]), cpu), []
        run_chain(segmented.forward_steps(lambda: None, output.append), cpu)
        return [output[0].loss, *(v for v in segmented.state.values() if isinstance(v, torch.Tensor))]

    memory = {"plain": kept_after(lambda: [model(data[0][0], labels=data[0][1]).loss]), "cut": kept_after(cut_forward)}
    times = {"plain": [], "overlapped": [], "split": [], "whole": [], "store": [], "retained": []}
    cpu_times = {name: [] for name in times}  # this rank's CPU time: less sensitive to a loaded machine
    for repeat in range(args.repeats + 1):  # the first of each is a warm-up
        for name, step in (("plain", plain), ("overlapped", overlapped), ("split", split),
                           *((mode, functools.partial(last_stage, mode)) for mode in ("whole", "store", "retained"))):
            model.zero_grad(set_to_none=True)
            last.zero_grad(set_to_none=True)
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            cpu_s = time.process_time() - cpu_start
            dist.barrier()
            if repeat:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(cpu_s)
    if dist.get_rank() == 0:
        plain_s, overlapped_s = statistics.median(times["plain"]), statistics.median(times["overlapped"])
        print(f"preset {args.preset}, EP2 on gloo, 2 micro-batches of {args.batch}x{args.seq}, "
              f"median of {args.repeats}: plain {plain_s * 1e3:.1f} ms, overlapped step {overlapped_s * 1e3:.1f} ms, "
              f"ratio {overlapped_s / plain_s:.3f} (per repeat: "
              + ", ".join(f"{o / p:.3f}" for o, p in zip(times["overlapped"], times["plain"])) + ")")
        split_s = statistics.median(times["split"])
        print(f"backward split into B and deferred W (W runs the GEMMs B stored): {split_s * 1e3:.1f} ms, "
              f"ratio to the overlapped step {split_s / overlapped_s:.3f}")
        median = {name: statistics.median(values) for name, values in cpu_times.items()}
        print(f"rank 0 CPU time, median: plain {median['plain'] * 1e3:.1f} ms, overlapped "
              f"{median['overlapped'] * 1e3:.1f} ms, split {median['split'] * 1e3:.1f} ms; split / overlapped "
              f"{median['split'] / median['overlapped']:.3f}")
        print(f"last stage, forward + backward of both micro-batches, rank 0 CPU time, median: whole "
              f"{median['whole'] * 1e3:.1f} ms; split, W from the store {median['store'] * 1e3:.1f} ms "
              f"({median['store'] / median['whole']:.3f}); split, W walking the retained graph "
              f"{median['retained'] * 1e3:.1f} ms ({median['retained'] / median['whole']:.3f}); store / retained "
              f"{median['store'] / median['retained']:.3f} (per repeat: " + ", ".join(
                  f"{a / b:.3f}" for a, b in zip(cpu_times["store"], cpu_times["retained"])) + ")")
        print(f"activation bytes after one forward: plain {memory['plain'] / 2**20:.2f} MiB, cut into pieces "
              f"{memory['cut'] / 2**20:.2f} MiB, ratio {memory['cut'] / memory['plain']:.3f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from distributed import free_port

    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", *sys.argv[1:]], env=env))
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
