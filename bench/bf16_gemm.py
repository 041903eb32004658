"""bf16 grouped GEMMs on the CPU: the brgemm ukernel and the own AVX512-BF16 kernels against one oneDNN matmul per row block, and all
against the dense bf16 product of equal FLOPs, side by side in one process.

    python bench/bf16_gemm.py [--tokens 4096] [--d 512] [--f 2048] [--experts 1,8,32,128] [--isa AVX512_CORE_BF16]

`--isa` caps oneDNN's ISA (ONEDNN_MAX_CPU_ISA, set before torch loads): AVX512_CORE_BF16 measures the
vdpbf16ps path on a CPU that also has AMX. Prints the machine first; run it on a quiet machine.
"""
import argparse, os, sys, time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=2048)
    p.add_argument("--experts", default="1,8,32,128")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--isa", default=None, help="ONEDNN_MAX_CPU_ISA for this run (e.g. AVX512_CORE_BF16, AVX512_CORE_AMX)")
    args = p.parse_args()
    if args.isa: os.environ["ONEDNN_MAX_CPU_ISA"] = args.isa
    import torch
    from flanmoe_nb import kernels as K, extension as X
    from flanmoe_nb.bench import machine_line
    C = X._C
    print(machine_line())
    print(f"oneDNN cap: {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}")
    modes = [m for m, ok in (("brgemm", C.bf16_brgemm_available()), ("avx512bf16", C.bf16_dp_available())) if ok]
    if not modes:
        print("neither the brgemm ukernel nor the AVX512-BF16 kernels run here: nothing to compare"); return

    def bench(fn):
        fn()
        t = time.perf_counter()
        for _ in range(args.reps): fn()
        return (time.perf_counter() - t) / args.reps * 1e3

    T, d, f = args.tokens, args.d, args.f
    a, dy = torch.randn(T, d).bfloat16(), torch.randn(T, f).bfloat16()
    w1 = torch.randn(d, f).bfloat16()
    dense = [bench(lambda: a @ w1), bench(lambda: dy @ w1.t()), bench(lambda: a.t() @ dy)]
    flop = 2 * T * d * f
    print(f"dense bf16 [{T},{d}]x[{d},{f}]: fwd {dense[0]:.1f} ms ({flop / dense[0] / 1e6:.0f} GFLOP/s), "
          f"dX {dense[1]:.1f}, dW {dense[2]:.1f} ms")
    print(f"{'E':>5} {'path':>10} {'fwd ms':>8} {'dX ms':>8} {'dW ms':>8} {'sum/dense':>10}")
    before = C.bf16_gemm_active()
    try:
        for E in (int(e) for e in args.experts.split(",")):
            gs = torch.full((E,), T // E, dtype=torch.long); gs[-1] += T - gs.sum()
            w = torch.randn(E, d, f).bfloat16()
            for mode in (*modes, "blas"):
                C.set_bf16_gemm(mode)
                ms = [bench(lambda: K.grouped_mm(a, w, gs)), bench(lambda: K.grouped_mm(dy, w, gs, True)),
                      bench(lambda: torch.ops.flanmoe.grouped_mm_wgrad(a, dy, gs))]
                print(f"{E:>5} {mode:>10} {ms[0]:>8.1f} {ms[1]:>8.1f} {ms[2]:>8.1f} {sum(ms) / sum(dense):>10.2f}")
    finally:
        C.set_bf16_gemm(before)


if __name__ == "__main__":
    sys.exit(main())
