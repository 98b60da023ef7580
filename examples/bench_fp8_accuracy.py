"""Accuracy of fine-grained FP8 (report section 3.3.2): 1x128 tiles / 128x128 blocks vs per-tensor scaling.

Prints relative errors against an FP64 reference of the same GEMM, on activations with outlier
channels (K/128 channels, i.e. 0.8%, 100x larger), with and without a log-normal spread of token magnitudes,
then the error of Fp8Linear's output and gradients against an FP32 nn.Linear.

    python examples/bench_fp8_accuracy.py [--shapes 512x1024x1024,2048x2048x2048]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from megatron_dsv3.fp8 import Fp8Linear, describe_backend, fp8_gemm, quantize_blocks, quantize_tensor, quantize_tiles


def outlier_activations(M, K, ratio, n_outliers, token_spread, gen):
    x = torch.randn(M, K, generator=gen)
    x[:, torch.randperm(K, generator=gen)[:n_outliers]] *= ratio
    return x * torch.exp(token_spread * torch.randn(M, 1, generator=gen))


def errors(y, ref):
    """(relative Frobenius error, mean over tokens of each token's relative error)."""
    diff = y.double() - ref
    return float(diff.norm() / ref.norm()), float((diff.norm(dim=-1) / ref.norm(dim=-1)).mean())


def gemm_rows(M, N, K, gen):
    w = torch.randn(N, K, generator=gen) * 0.02
    cases = (("gaussian, no outliers (control)", 1.0, 0.0), ("outlier channels x100", 100.0, 0.0),
             ("outlier channels x100 + token spread lognormal(0,2)", 100.0, 2.0))
    for label, ratio, spread in cases:
        x = outlier_activations(M, K, ratio, max(1, K // 128), spread, gen)
        ref = x.double() @ w.double().T
        tile = errors(fp8_gemm(*quantize_tiles(x), *quantize_blocks(w)), ref)
        (qx, sx), (qw, sw) = quantize_tensor(x), quantize_tensor(w)
        tensor = errors((qx.float() @ qw.float().T) * (sx * sw), ref)
        yield (f"{M}x{N}x{K}", label, *tile, *tensor, tile[0] / tensor[0], tile[1] / tensor[1])


def linear_rows(tokens, in_f, out_f, gen):
    ref = nn.Linear(in_f, out_f)
    fp8 = Fp8Linear.from_linear(nn.Linear(in_f, out_f))
    fp8.load_state_dict(ref.state_dict())
    x = torch.randn(tokens, in_f, generator=gen)
    dy = torch.randn(tokens, out_f, generator=gen)
    grads = []
    for mod in (fp8, ref):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(dy)
        grads.append((y.detach(), xi.grad, mod.weight.grad))
    for name, got, want in zip(("y (Fprop)", "dx (Dgrad)", "dW (Wgrad)"), *grads):
        yield f"{tokens}x{out_f}x{in_f}", name, float((got - want).norm() / want.norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="512x1024x1024,1024x2048x2048,2048x1024x4096", help="MxNxK list")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    print(describe_backend())
    print("\nGEMM y = x W^T, relative error vs FP64 (Frobenius | mean per token); ratio = tile / per-tensor")
    print("| MxNxK | activations | tile frob | tile token | tensor frob | tensor token | ratio frob | ratio token |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        M, N, K = map(int, shape.split("x"))
        for row in gemm_rows(M, N, K, gen):
            print("| {} | {} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.2f} | {:.2f} |".format(*row))
    print("\nFp8Linear vs FP32 nn.Linear, relative Frobenius error")
    print("| tokens x out x in | tensor | rel err |")
    print("|---|---|---|")
    M, N, K = map(int, args.shapes.split(",")[0].split("x"))
    for row in linear_rows(M, K, N, gen):
        print("| {} | {} | {:.4f} |".format(*row))


if __name__ == "__main__":
    main()
