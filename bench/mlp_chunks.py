"""Row-chunked MLP: does keeping the intermediate in L2 pay? cuBLAS fc1 -> fc2 (the ViT's 5184 x
1024 -> 4736 -> 1024, fp16) on all rows against 2, 4 and 8 chunks of rows with one reused
intermediate buffer (12 MB for 4 chunks, which L2 can hold). Sustained CUDA-graph replays (the
board at its power cap), variants alternating; with ``ncu`` the DRAM bytes of each variant.

    python3 bench/mlp_chunks.py                               # time (GPU, PyTorch with CUDA)
    ncu --nvtx --nvtx-include "c4/" --cache-control none --clock-control none
        --metrics dram__bytes_read.sum,dram__bytes_write.sum --csv python3 bench/mlp_chunks.py ncu
                                                              (one command line; c1, c2, c4, c8)

Session 16's answer (H100, bench/results/h100-mlp-chunks.txt): chunks cut the DRAM
writes (76 -> 40 MB with 4 chunks) but cost more time than they save (0.163 -> 0.196 ms).
"""
import sys

M, C, H = 5184, 1024, 4736
VARIANTS = [1, 2, 4, 8]


def main() -> int:
    import torch

    torch.manual_seed(0)
    x = torch.randn(M, C, device="cuda", dtype=torch.half)
    w1 = torch.randn(H, C, device="cuda", dtype=torch.half) / 32
    b1 = torch.randn(H, device="cuda", dtype=torch.half)
    w2 = torch.randn(C, H, device="cuda", dtype=torch.half) / 69
    b2 = torch.randn(C, device="cuda", dtype=torch.half)
    y = torch.empty(M, C, device="cuda", dtype=torch.half)
    hbuf = torch.empty(M, H, device="cuda", dtype=torch.half)  # chunk c uses its first rows

    def run(chunks):
        rows = (M + chunks - 1) // chunks
        for i in range(chunks):
            r0, r1 = i * rows, min(M, (i + 1) * rows)
            h = hbuf[: r1 - r0]
            torch.addmm(b1, x[r0:r1], w1.t(), out=h)
            torch.addmm(b2, h, w2.t(), out=y[r0:r1])

    ref = None
    for c in VARIANTS:
        run(c)
        torch.cuda.synchronize()
        if ref is None:
            ref = y.clone()
        else:
            print("chunks", c, "max diff vs whole", (y - ref).abs().max().item())
    if len(sys.argv) > 1 and sys.argv[1] == "ncu":  # one pair per variant, each in an NVTX range
        for c in VARIANTS:
            torch.cuda.nvtx.range_push(f"c{c}")
            run(c)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        return 0
    graphs = {}
    for c in VARIANTS:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run(c)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(10):
                run(c)
        graphs[c] = g
    for _ in range(30):  # warm the board up to its power cap
        graphs[1].replay()
    torch.cuda.synchronize()
    res = {c: [] for c in VARIANTS}
    for _ in range(4):
        for c in VARIANTS:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(30):
                graphs[c].replay()
            e1.record()
            torch.cuda.synchronize()
            res[c].append(e0.elapsed_time(e1) / 300)
    for c in VARIANTS:
        v = sorted(res[c])
        print(f"chunks {c}: ms per fc1+fc2 {', '.join(f'{t:.4f}' for t in res[c])} (median {v[len(v) // 2]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
