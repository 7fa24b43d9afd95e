"""
Benchmarks: the mHC kernels against PyTorch (eager and compiled), with a roofline column, and
whole training steps of residual / HC / mHC GPTs.

    python bench.py                      # the kernels and the main models, on the GPU it finds
    python bench.py --only=kernels       # Sinkhorn and stream mixing only
    python bench.py --only=e2e --n_streams=2
    python bench.py --only=e2e --models=residual,mhc    # a quick check: two models, about two minutes
    python bench.py --only=e2e --eager_torch=False      # skip the slow plain-PyTorch eager rows
    python bench.py --variants=True             # add the other stream dtype and the recompute models
    python bench.py --compiled_torch_mhc=True   # add plain-PyTorch mHC compiled (slow to compile)
    python bench.py --only=e2e --peers=True     # add Liger-Kernel's LigerMHC (pip install liger-kernel)
    python bench.py --only=ptxas         # registers and spills of every kernel for sm_90, no GPU needed
    python bench.py --only=e2e --profile=True   # GPU time by kernel group (GEMM, attention, ours, ...)
    python bench.py --only=e2e --compile_mode=default   # the models without CUDA graphs (the GPU waits on launches)
    python bench.py --only=compile       # cold compile times: each model in a fresh process, empty caches
    python bench.py --only=tiles --n_streams=8   # sweep the stream kernels' tiles for this GPU and shape (minutes)

Kernels are timed with triton.testing.do_bench (median); bytes are what each op must move at
the least (every input read once, every output written once), and "% copy" compares the
achieved bytes/s with a device-to-device copy measured in the same run. "fwd+bwd" rows go through
autograd; "bwd kernel" rows time a backward kernel alone. On a GPU, "in kernels" is the part of
that time the GPU spends in kernels (torch.profiler): far below it, the op is bound by the CPU's
launches and autograd, not by its kernels. End to end: median ms per training step
(forward, backward, AdamW) after warm-up, tokens/s, peak memory, and the time of the first step
(compilation, with an empty compile cache), and on a GPU "GPU busy": the share of the step the
GPU spends in kernels (under 100%, it waits on the CPU's launches). Ratios against the residual
model are the claim, not absolute times; BENCHMARKS.md gives each figure with its GPU, date and command.
"""
import concurrent.futures
import functools
import importlib.util
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

import mhc
from configurator import at_least, settings
from model import GPT, GPTConfig
from train import auto_stream_dtype, check_compile_mode, check_system, torch_compile_mode

DEFAULTS = dict(
    only="all",             # "all", "kernels", "e2e", "compile", "tiles", or "ptxas" (compile for sm_90, no GPU needed)
    device="auto",          # "cpu" runs a tiny smoke version (no meaningful times)
    matrices=393216,        # Sinkhorn: 16k tokens x 24 sublayers
    tokens=16384,           # stream mixing: tokens of one sublayer
    n_streams=4,            # n, the streams of HC and mHC
    n_embd=768,             # the model of the end-to-end steps: GPT-2 124M by default
    n_layer=12,
    n_head=12,
    batch_size=16,          # sequences per step
    block_size=1024,        # tokens per sequence
    steps=20,               # timed training steps (after warm-up)
    models="residual,hc,mhc",  # the end-to-end models (also mhc_lite); e.g. --models=residual,mhc for a quick check
    compile=True,           # torch.compile the models (and time the compiled PyTorch ops)
    compile_mode="auto",    # torch.compile's mode for the models, as train.py's: auto (CUDA graphs on a GPU), default, ...
    eager_torch=True,       # also time plain-PyTorch HC and mHC eager (mhc.py as written; slow on a GPU)
    compiled_torch_mhc=False,  # also time plain-PyTorch mHC under torch.compile (minutes to compile)
    variants=False,         # also the other stream dtype (fp32 on a GPU) and recomputation (a minute each to compile)
    peers=False,            # also Liger-Kernel's LigerMHC in our GPT, beside our mHC with the same bf16 stream
    profile=False,          # where each model's step spends its GPU time (kernel groups; the mHC step kernel by kernel)
    rounds=2,               # --only=compile: cold compiles of each model, the models alternating
    tile_kernels="pre_fwd,pre_bwd,post_fwd,post_bwd",  # --only=tiles: the stream kernels whose tiles it sweeps
    tile_top=3,             # --only=tiles: how many of the fastest tiles it lists
)
TILE_KERNELS = ("pre_fwd", "pre_bwd", "post_fwd", "post_bwd")


def triton_kernels(device):
    """The Triton kernels when they can run here (mhc.ops decides: on a GPU, or on the CPU in
    Triton's interpreter), else None."""
    try:
        return mhc.ops("triton", torch.empty(0, device=device))
    except RuntimeError:
        return None


def bench_fn(fn, device):
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def copy_bandwidth(device):
    """Bytes/s of a device-to-device copy (read + write), the practical memory roofline."""
    x = torch.empty(256 * 2**20 if device == "cuda" else 2**22, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = bench_fn(lambda: y.copy_(x), device)
    return 2 * x.numel() * 4 / (ms * 1e-3)


@functools.lru_cache(maxsize=None)
def l2_flush(calls):
    """(a 256 MB buffer whose zeroing flushes L2, as do_bench does, and the GPU ms of `calls` zeroings),
    made once for every kernel row."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    return flush, gpu_busy_ms(flush.zero_, calls)


def gpu_kernel_ms(fn, device, calls=10):
    """Milliseconds of one fn() spent in GPU kernels (torch.profiler), L2 flushed before each call as
    do_bench does; None off the GPU. Well below the timed milliseconds, the op waits on the CPU's
    launches, not on its kernels."""
    if device != "cuda":
        return None
    try:
        flush, flush_ms = l2_flush(calls)
        return gpu_busy_ms(lambda: (flush.zero_(), fn()), calls) - flush_ms
    except Exception:  # the profiler does not work here: "nan" in the column, the table goes on
        return float("nan")


def timed(fn, device):
    """(median ms of fn(), ms of it in GPU kernels or None)."""
    return bench_fn(fn, device), gpu_kernel_ms(fn, device)


def row(name, t, nbytes, bw, base_ms=None):
    ms, gpu = t
    gbs = nbytes / (ms * 1e-3) / 1e9
    speedup = f"{base_ms / ms:7.1f}x" if base_ms else "      -"
    gpu = f"{gpu:9.3f}" if gpu is not None else f"{'-':>9}"
    print(f"{name:<56} {ms:9.3f} ms {gpu} ms {nbytes / 1e6:10.1f} MB {gbs:9.0f} GB/s {100 * gbs * 1e9 / bw:6.1f}% {speedup}")


def fwd_bwd(fn, inputs, grads):
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        torch.autograd.backward(out, grads)
    return run


def bench_kernels(c, device):
    K = triton_kernels(device)
    bw = copy_bandwidth(device)
    print(f"\ncopy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    print(f"{'op':<56} {'time':>12} {'in kernels':>12} {'min bytes':>13} {'achieved':>14} {'% copy':>7} {'vs eager':>8}")
    def compare(name, op, inputs, grads, fwd_bytes, bwd_bytes, *args):
        """fwd and fwd+bwd rows of mhc's op, torch.compile of it and its Triton kernel, the same inputs."""
        variants = [("torch eager", getattr(mhc, op))]
        if c["compile"]:
            variants.append(("torch.compile", torch.compile(getattr(mhc, op))))
        if K:
            variants.append(("triton", getattr(K, op)))
        base = {}
        for label, fn in variants:
            with torch.no_grad():
                t = timed(lambda: fn(*inputs, *args), device)
            row(f"{name} fwd, {label}", t, fwd_bytes, bw, base.setdefault("f", t[0]))
            t = timed(fwd_bwd(lambda *x: fn(*x, *args), inputs, grads), device)
            row(f"{name} fwd+bwd, {label}", t, bwd_bytes, bw, base.setdefault("b", t[0]))

    for n in (4, 8):
        N = c["matrices"]
        L = torch.randn(N, n, n, device=device, requires_grad=True)
        G = torch.randn(N, n, n, device=device)
        # bytes: fwd L, H; + bwd L, G, dL
        compare(f"sinkhorn {n}x{n} x{N}", "sinkhorn", [L], [G], 2 * N * n * n * 4, 5 * N * n * n * 4, 20)
        if K:  # the backward kernel alone (it recomputes the forward on chip)
            with torch.no_grad():
                t = timed(lambda: K.sinkhorn_bwd(G, L, 20), device)
            row(f"sinkhorn {n}x{n} x{N} bwd kernel, triton", t, 3 * N * n * n * 4, bw)
        # mHC's gates and Sinkhorn from the projection h [N, 2n + n^2] (Eqs. 3-4), what a connection runs
        W = 2 * n + n * n
        h = torch.randn(N, W, device=device, requires_grad=True)
        alpha = torch.full((3,), 0.5, device=device, requires_grad=True)
        b = torch.randn(W, device=device, requires_grad=True)
        grads = [torch.randn(N, n, device=device), torch.randn(N, n, device=device), G]
        # bytes: fwd h and the maps; + bwd h, the maps' gradients, dh
        compare(f"coefficients n={n} x{N}", "coefficients", [h, alpha, b], grads, 2 * N * W * 4, 5 * N * W * 4, n, 20)
        # HC's gates from its per-stream projection p [N, n, n + 2], the same bytes
        p = torch.randn(N, n, n + 2, device=device, requires_grad=True)
        compare(f"hc_gates n={n} x{N}", "hc_gates", [p, alpha, b], [torch.randn(N, W, device=device)],
                2 * N * W * 4, 5 * N * W * 4)
    # stream mixing of one sublayer: x [M, n, C] fp32 stream, y [M, C] bf16 sublayer output
    n, C, M = c["n_streams"], c["n_embd"], c["tokens"]
    x = torch.randn(M, n, C, device=device, requires_grad=True)
    y = torch.randn(M, C, device=device, dtype=torch.bfloat16, requires_grad=True)
    h_pre = torch.rand(M, n, device=device, requires_grad=True)
    h_res = torch.rand(M, n, n, device=device, requires_grad=True)
    h_post = torch.rand(M, n, device=device, requires_grad=True)
    nbytes = stream_bytes(n, C, M, x.element_size(), y.element_size())
    g_in, g_out = torch.ones(M, C, device=device), torch.ones(M, n, C, device=device)  # upstream gradients
    ops = [("stream_pre", lambda f: (lambda: f.stream_pre(x, h_pre)), nbytes["pre_fwd"],
            lambda f: fwd_bwd(f.stream_pre, [x, h_pre], [g_in]), nbytes["pre_bwd"]),
           ("stream_post", lambda f: (lambda: f.stream_post(x, y, h_res, h_post)), nbytes["post_fwd"],
            lambda f: fwd_bwd(f.stream_post, [x, y, h_res, h_post], [g_out]), nbytes["post_bwd"])]

    class Compiled:
        stream_pre, stream_post = torch.compile(mhc.stream_pre), torch.compile(mhc.stream_post)

    impls = [("torch eager", mhc)] + ([("torch.compile", Compiled)] if c["compile"] else []) + ([("triton", K)] if K else [])
    for name, make_fwd, fbytes, make_bwd, bbytes in ops:
        base = {}
        for label, impl in impls:
            with torch.no_grad():
                t = timed(make_fwd(impl), device)
            row(f"{name} n={n} C={C} x{M} fwd, {label}", t, fbytes, bw, base.setdefault("f", t[0]))
            t = timed(make_bwd(impl), device)
            row(f"{name} n={n} C={C} x{M} fwd+bwd, {label}", t, fbytes + bbytes, bw, base.setdefault("b", t[0]))
    if K:  # the backward kernels alone, without autograd around them: their own share of copy bandwidth
        with torch.no_grad():
            t = timed(lambda: K.stream_pre_bwd(g_in, x, h_pre), device)
            row(f"stream_pre n={n} C={C} x{M} bwd kernel, triton", t, nbytes["pre_bwd"], bw)
            t = timed(lambda: K.stream_post_bwd(g_out, x, y, h_res, h_post), device)
            row(f"stream_post n={n} C={C} x{M} bwd kernel, triton", t, nbytes["post_bwd"], bw)
    l2_flush.cache_clear()  # free the 256 MB buffer: it would count in every end-to-end model's peak memory


def stream_bytes(n, C, M, x_bytes, y_bytes):
    """The least bytes each stream kernel moves, every input read once and every output written once:
    the stream x [M, n, C] and its gradient, the sublayer's output y [M, C] and its gradient, its fp32
    input [M, C] and that input's gradient, and the fp32 maps and their gradients."""
    xb, yb, fb = M * n * C * x_bytes, M * C * y_bytes, M * C * 4
    pre, post = M * n * 4, M * (n * n + n) * 4  # H_pre; H_res and H_post
    return {"pre_fwd": xb + pre + fb,                # read x and H_pre, write the layer input
            "pre_bwd": 2 * xb + 2 * pre + fb,        # read x, H_pre and the input's gradient, write dx, dH_pre
            "post_fwd": 2 * xb + yb + post,          # read x, y and the maps, write x_next
            "post_bwd": 3 * xb + 2 * yb + 2 * post}  # read x, y, the maps and dx_next, write dx, dy and the maps'


def tile_candidates(streams):
    """(tokens, channels, warps) a program to try: 64 to 512 channels, 4 to 128 values a thread (a
    tile holds `streams` streams of each of its tokens)."""
    return [(bm, bc, w) for bm in (1, 2, 4, 8, 16) for bc in (64, 128, 256, 512) for w in (1, 2, 4, 8)
            if 4 <= bm * streams * bc // (32 * w) <= 128]


def tile_launches(K, c, device):
    """The four stream kernels launched at this shape (--n_streams, --n_embd, --tokens) in the stream
    dtype of training, the _TILES key they use, the stream's value bytes and its dtype's name."""
    _, _, stream = precision(device)
    n, C, M = c["n_streams"], c["n_embd"], c["tokens"]
    x, g = (torch.randn(M, n, C, device=device).to(getattr(torch, stream)) for _ in range(2))
    y = torch.randn(M, C, device=device).to(x.dtype)
    g_in = torch.randn(M, C, device=device)  # the gradient of the fp32 sublayer input
    h_pre, h_post, h_res = (torch.rand(M, *shape, device=device) for shape in ((n,), (n,), (n, n)))
    kernels = {"pre_fwd": lambda: K.stream_pre(x, h_pre), "pre_bwd": lambda: K.stream_pre_bwd(g_in, x, h_pre),
               "post_fwd": lambda: K.stream_post(x, y, h_res, h_post),
               "post_bwd": lambda: K.stream_post_bwd(g, x, y, h_res, h_post)}
    return kernels, K._tile_key(n, x.element_size()), x.element_size(), stream


def tiles_to_try(K, name, n, C, value_bytes):
    """The shipped tile of a stream kernel, then every candidate."""
    streams = 1 if name == "post_bwd" else K._stream_tiles(name, n, C, value_bytes)[0]  # post bwd: a stream at a time
    return [K._TILES[name][K._tile_key(n, value_bytes)]] + tile_candidates(streams)


def compile_tiles(c, gpu, jobs):
    """In a worker process: launch each (kernel, tile) of `jobs` once, which leaves it compiled in
    Triton's on-disk cache."""
    torch.cuda.set_device(gpu)
    K = triton_kernels("cuda")
    kernels, key, _, _ = tile_launches(K, c, "cuda")
    for name, tile in jobs:
        K._TILES[name][key] = tile
        kernels[name]()
    torch.cuda.synchronize()


def bench_tiles(c, device):
    """The stream kernels' tiles swept at this shape on this GPU. sinkhorn_kernel.py ships the
    fastest tiles of sweeps on an H200 at n = 4 and 8 (its _TILES); another GPU or C may want others.
    Each kernel is launched directly with its shipped tile and with every candidate; a candidate
    whose outputs differ from the shipped tile's by more than rounding is a bug, reported and left
    out of the ranking (tiles sum in different orders, so a bf16 output may differ by an ulp)."""
    K = triton_kernels(device)
    if K is None:
        print("--only=tiles launches the Triton kernels: it needs a GPU (or TRITON_INTERPRET=1 on the CPU)")
        return
    n, C, M, names = c["n_streams"], c["n_embd"], c["tokens"], c["tile_kernels"].split(",")
    kernels, key, vb, stream = tile_launches(K, c, device)
    if device == "cuda":  # compile every tile first, in parallel: the timing below then finds each in Triton's cache
        jobs = [(name, tile) for name in names for tile in tiles_to_try(K, name, n, C, vb)]
        workers = max(1, min(8, (os.cpu_count() or 2) // 2, len(jobs)))
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(compile_tiles, [c] * workers, [torch.cuda.current_device()] * workers,
                          [jobs[i::workers] for i in range(workers)]))
    all_bytes = stream_bytes(n, C, M, vb, vb)
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)
    bw = copy_bandwidth(device)
    print(f"\nstream kernel tiles: n={n} C={C} x{M} tokens, {stream} stream; tokens x channels a program, warps "
          f"(sinkhorn_kernel._TILES[kernel][{key}]): time, % of copy bandwidth ({bw / 1e9:.0f} GB/s)")
    rtol = lambda t: 1e-4 if t.dtype in (torch.float32, torch.float64) else 2 * torch.finfo(t.dtype).eps
    for name in names:
        fn, nbytes = kernels[name], all_bytes[name]
        shipped, ref, rows, seen = K._TILES[name][key], as_tuple(fn()), [], set()
        for tile in tiles_to_try(K, name, n, C, vb):  # the shipped tile first
            K._TILES[name][key] = tile
            try:
                shape = K._stream_tiles(name, n, C, vb)[1:]  # tokens, channels (at most C) and warps of a program
                if shape in seen:
                    continue
                seen.add(shape)
                outs = as_tuple(fn())
                if not all(torch.allclose(a.float(), b.float(), rtol=rtol(a), atol=1e-4) for a, b in zip(outs, ref)):
                    print(f"{'':<9} {shape[0]} x {shape[1]}, {shape[2]} warps: WRONG RESULT")
                    continue
                rows.append((bench_fn(fn, device), shape))
            finally:
                K._TILES[name][key] = shipped
        show = lambda ms, shape: f"{shape[0]} x {shape[1]}, {shape[2]} warps: {ms:.3f} ms, {nbytes / ms / 1e-3 / bw:.0%}"
        print(f"{name:<9} shipped {show(*rows[0])}")
        for i, r in enumerate(sorted(rows)[:c["tile_top"]]):
            print(f"{'':<9} {'fastest' if i == 0 else '':<7} {show(*r)}")


def allow_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: the maps' fp32 projection may use TF32
    torch.backends.cudnn.allow_tf32 = True


def precision(device):
    """The end-to-end models' compute dtype, autocast context and stream dtype: bf16 on a GPU, and
    the stream as train.py stores it by default (bf16 when the step runs in bf16)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ctx = torch.autocast(device, dtype=dtype) if device == "cuda" else torch.autocast(device, enabled=False)
    return dtype, ctx, auto_stream_dtype(str(dtype).removeprefix("torch."))


def model_shape(c):
    return dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                bias=False, n_streams=c["n_streams"])


def bench_e2e(c, device):
    dtype, ctx, stream = precision(device)
    shape = model_shape(c)
    # (residual, kernel, compiled, recompute, stream dtype)
    cc = c["compile"]
    other = "float32" if stream == "bfloat16" else "bfloat16"
    runs = [("residual", "torch", cc, False, "float32")]
    if c["eager_torch"]:
        runs += [("hc", "torch", False, False, stream), ("mhc", "torch", False, False, stream)]
    if c["compiled_torch_mhc"]:
        runs.append(("mhc", "torch", True, False, stream))
    if triton_kernels(device):
        runs += [("hc", "triton", cc, False, stream), ("mhc", "triton", cc, False, stream),
                 ("mhc_lite", "triton", cc, False, stream)]
        if c["variants"]:
            runs += [("mhc", "triton", cc, False, other), ("hc", "triton", cc, False, other),
                     ("mhc", "triton", cc, True, stream), ("mhc", "triton", cc, True, other)]
        if c["peers"]:  # Liger's mHC keeps its stream in bf16: ours with the same stream beside it
            if stream != "bfloat16" and not c["variants"]:
                runs.append(("mhc", "triton", cc, False, "bfloat16"))
            runs.append(("mhc", "liger", cc, False, "bfloat16"))
    runs = [run for run in runs if run[0] in c["models"].split(",")]
    tokens = c["batch_size"] * c["block_size"]
    print(f"\nend to end: {c['n_layer']} layers, C={c['n_embd']}, n={c['n_streams']}, "
          f"{c['batch_size']}x{c['block_size']} tokens, {dtype}, AdamW")
    print(f"{'model':<52} {'ms/step':>9} {'tok/s':>10} {'x resid':>8} {'peak GiB':>9} {'x resid':>8} {'1st step s':>10} "
          f"{'GPU busy':>8}")
    base, groups = None, {}
    for residual, kernel, compiled, recompute, stream_dtype in runs:
        name = "Liger-Kernel LigerMHC" if kernel == "liger" else kernel
        label = (f"{residual}, {name}, {'compiled' if compiled else 'eager'}{', recompute' if recompute else ''}"
                 + ("" if residual == "residual" else f", {'bf16' if stream_dtype == 'bfloat16' else 'fp32'} stream"))
        try:
            ms, peak, first, step = time_model(c, device, ctx, shape, residual, kernel, compiled, recompute,
                                               stream_dtype)
        except Exception as e:  # a peer's failure costs its row, not the table
            if kernel != "liger":
                raise
            print(f"{label:<52} failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
            continue
        base = base or (ms, peak)
        try:  # a profiler that does not work here costs the column, not the table
            busy = f"{gpu_busy_ms(step) / ms:8.0%}" if device == "cuda" else f"{'-':>8}"
        except Exception:
            busy = f"{'?':>8}"
        print(f"{label:<52} {ms:9.1f} {tokens / ms * 1e3:10.0f} {ms / base[0]:7.2f}x {peak:9.2f} "
              f"{peak / base[1]:7.2f}x {first:10.1f} {busy}")
        if c["profile"] and device == "cuda":
            groups[label] = group_ms(step)
            if residual == "mhc" and kernel == "triton" and not recompute and stream_dtype == stream:
                profile_steps(step, label)
        del step  # the model and its optimizer go before the next one's peak memory is measured
    if groups:
        print(f"\nGPU time a step by kernel group, ms (torch.profiler, 3 steps):\n{'model':<52}"
              + "".join(f"{g:>16}" for g in GROUP_NAMES) + f"{'all':>10}")
        for label, ms in groups.items():
            print(f"{label:<52}" + "".join(f"{ms[g]:16.2f}" for g in GROUP_NAMES) + f"{sum(ms.values()):10.2f}")


def build_step(c, device, ctx, shape, residual, kernel, compiled, recompute, stream_dtype):
    """One model, its optimizer and a batch: (the model, the model as called (compiled or not), a
    batch, one training step as a function)."""
    torch.manual_seed(0)
    if device == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = GPT(GPTConfig(residual=residual, kernel="torch" if kernel == "liger" else kernel, recompute=recompute,
                          stream_dtype=stream_dtype, **shape))
    if kernel == "liger":
        with_liger_connections(model)
    model.to(device)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
    step_model = torch.compile(model, mode=torch_compile_mode(c["compile_mode"], device)) if compiled else model
    x = torch.randint(0, 50257, (c["batch_size"], c["block_size"]), device=device)

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # with CUDA graphs: the last step's outputs are done with
        with ctx:
            _, loss = step_model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step_model, x, step


def time_model(c, device, ctx, shape, residual, kernel, compiled, recompute, stream_dtype):
    """(median ms a training step, peak GiB, seconds of the first step, the step function) of one model."""
    _, _, _, step = build_step(c, device, ctx, shape, residual, kernel, compiled, recompute, stream_dtype)
    t = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t
    for _ in range(3):
        step()
    ms = bench_fn(step, device) if device != "cuda" else _median_steps(step, c["steps"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return ms, peak, first, step


def bench_compile(c, device):
    """Cold compile times, as a user's first `python train.py` pays them: each model in a fresh
    process with empty Inductor and Triton caches, compiling what train.py runs first (an
    evaluation forward, then a training step), the models alternating, --rounds times."""
    models = c["models"].split(",")
    args = [f"--{k}={c[k]}" for k in ("device", "compile", "compile_mode", "n_streams", "n_embd", "n_layer", "n_head",
                                      "batch_size", "block_size")]
    print("\ncold compile, seconds: the evaluation forward and the first training step, each model in a fresh "
          "process with empty caches")
    totals, phases = {m: [] for m in models}, {m: [] for m in models}
    for r in range(c["rounds"]):
        for m in models:
            cache, env = cold_cache()
            p = subprocess.run([sys.executable, "-c", "import sys, bench; bench.compile_once(sys.argv[1], sys.argv[2:])",
                                m, *args], cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, **env},
                               capture_output=True, text=True)
            shutil.rmtree(cache, ignore_errors=True)
            if p.returncode != 0:
                raise RuntimeError(f"compiling {m} failed:\n{p.stderr[-3000:]}")
            *_, phase_line, times = p.stdout.splitlines()
            t_eval, t_train = map(float, times.split())
            totals[m].append(t_eval + t_train)
            phases[m].append(json.loads(phase_line))
            print(f"{m:<10} round {r + 1}: evaluation {t_eval:6.1f}, training step {t_train:6.1f}, "
                  f"both {t_eval + t_train:6.1f}", flush=True)
    base = statistics.mean(totals["residual"])
    for m in models:
        print(f"{m:<10} mean {statistics.mean(totals[m]):6.1f} s = {statistics.mean(totals[m]) / base:.2f}x residual")
    # Where the time goes: torch's own compile timers (torch._dynamo.utils.compile_times), the
    # seconds of each phase over the two graphs, mean of the rounds. The phases nest (Inductor's
    # lowering is inside the compile of the graph it lowers), so the rows do not add up.
    mean = {m: {k: statistics.mean(r.get(k, 0.0) for r in phases[m]) for k in set().union(*phases[m])} for m in models}
    top = {k: max(mean[m].get(k, 0.0) for m in models) for k in set().union(*mean.values())}
    rows = sorted((k for k in top if top[k] >= 1.0), key=top.get, reverse=True)  # a second or more in some model
    if rows:
        print(f"\ncompile phases, seconds (torch's compile timers; phases nest, so rows overlap)\n{'phase':<48}"
              + "".join(f"{m:>10}" for m in models))
        for k in rows:
            print(f"{k[:47]:<48}" + "".join(f"{mean[m].get(k, 0):10.1f}" for m in models))


def compile_once(residual, argv):
    """One model's cold compile in this process (bench_compile starts a fresh one for each): prints
    the seconds of the evaluation forward and of the first training step, each with its compile."""
    c = settings(DEFAULTS, argv, allow_files=False)
    device = resolve_device(c)  # as main resolved it: --device comes as the user gave it
    if device == "cuda":
        allow_tf32()
    _, ctx, stream = precision(device)
    streams = residual != "residual"
    kernel = "triton" if streams and triton_kernels(device) else "torch"
    model, step_model, x, step = build_step(c, device, ctx, model_shape(c), residual, kernel, c["compile"], False,
                                            stream if streams else "float32")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time.perf_counter()
    model.eval()  # train.py evaluates before its first step: a graph of its own
    with torch.no_grad(), ctx:
        step_model(x, x)
    sync()
    t_eval = time.perf_counter() - t
    model.train()
    t = time.perf_counter()
    step()
    sync()
    t_train = time.perf_counter() - t
    try:  # torch's compile timers, each phase summed over the graphs compiled; {} where torch has none
        names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
        phase = {k: float(v) for k, v in zip(names, values)}
    except Exception:
        phase = {}
    print(json.dumps(phase))
    print(f"{t_eval:.3f} {t_train:.3f}")


def with_liger_connections(model):
    """Put Liger-Kernel's LigerMHC in place of every connection of an mHC GPT, wrapping the same
    sublayers (with their pre-norms): the same model with Liger's maps and kernels (--peers=True)."""
    from liger_kernel.transformers import LigerMHC
    n, C = model.config.n_streams, model.config.n_embd

    class Peer(nn.Module):
        """Our blocks call conn(x, sublayer); LigerMHC calls the layer it wraps."""
        def __init__(self, norm, layer):
            super().__init__()
            self.mhc = LigerMHC(nn.Sequential(norm, layer), hc=n, c=C, phi_dtype=torch.bfloat16, allow_fp32=True)

        def forward(self, x, sublayer):
            return self.mhc(x)

    for block in model.transformer.h:
        block.conn_attn, block.conn_mlp = Peer(block.ln_1, block.attn), Peer(block.ln_2, block.mlp)


def kernel_times(step, steps=3):
    """torch.profiler's CUDA kernel times over a few training steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof.key_averages()


# Kernel groups by CUDA kernel name (lower case), the first match wins: cuBLAS's and cuDNN's kernels, the
# optimizer's, this project's Triton ops, and the kernels Inductor generates (the rest of each compiled model)
KERNEL_GROUPS = (("GEMM", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
                 ("attention", ("sdpa", "flash", "fmha", "cudnn")),
                 ("optimizer", ("multi_tensor_apply",)),
                 ("Inductor", ("triton_",)),  # before ours: Inductor names a kernel after the ops it fuses
                 ("our Triton ops", ("_sinkhorn_", "_coefs_", "_hc_", "_pre_fwd", "_pre_bwd", "_post_fwd", "_post_bwd")))
GROUP_NAMES = tuple(group for group, _ in KERNEL_GROUPS) + ("other",)


def kernel_group(name):
    name = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")


def group_ms(step, steps=3):
    """GPU milliseconds a step in each kernel group (and "other": eager copies, fills, ...)."""
    ms = dict.fromkeys(GROUP_NAMES, 0.0)
    for e in kernel_times(step, steps):
        ms[kernel_group(e.key)] += e.self_device_time_total / steps / 1000
    return ms


def profile_steps(step, label, top=25):
    """Where the time of a training step goes, by CUDA kernel (3 steps)."""
    print(f"\nprofile of {label}, 3 steps, top {top} kernels by CUDA time:")
    print(kernel_times(step).table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))


def gpu_busy_ms(step, steps=3):
    """Milliseconds a step that the GPU spends in kernels. Below the step's wall time, the GPU waits
    on the CPU: the step is partly launch-bound."""
    return sum(e.self_device_time_total for e in kernel_times(step, steps)) / steps / 1000


def _median_steps(step, steps):
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ptxas_report():
    """Compile every kernel for an H100 (sm_90) without a GPU and print ptxas's register and
    spill counts: a check that the compiled path builds, with no timing in it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import sinkhorn_kernel as sk
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    print(f"\nkernels compiled for sm_90 by Triton {triton.__version__} (no GPU needed)")
    print(f"{'kernel':<34} {'regs':>5} {'spill bytes':>12}")

    def report(name, fn, consts, warps=4):
        # every *_ptr argument an fp32 tensor (the fp32 stream), every other runtime argument an int;
        # each a multiple of 16, as the JIT specializes them for the shapes here (pointers from
        # torch's allocator, C = 768, 16,384 tokens): without that the loads are not vectorized and
        # the layouts differ from the ones that run
        sig = {a: "constexpr" if a in consts else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        fields = dict(kv.split(":") for kv in usage.split("Resource usage:")[-1].split() if ":" in kv)
        print(f"{name:<34} {fields.get('REG', '?'):>5} {fields.get('STACK', '?'):>12}")

    for n in (4, 8):  # the tiles and warps the launches use (fp32 stream)
        for backward in (False, True):
            N_PAD, BLOCK, warps, _ = sk._sinkhorn_launch_args(1, n, backward=backward)
            for name, fwd, bwd in (("sinkhorn", sk._sinkhorn_fwd_kernel, sk._sinkhorn_bwd_kernel),
                                   ("coefficients", sk._coefs_fwd_kernel, sk._coefs_bwd_kernel)):
                report(f"{name} {'bwd' if backward else 'fwd'} n={n}", bwd if backward else fwd,
                       dict(n=n, N_PAD=N_PAD, ITERS=20, BLOCK=BLOCK), warps)
            N_PAD, K_PAD, BLOCK, _ = sk._hc_launch_args(1, n)
            report(f"hc_gates {'bwd' if backward else 'fwd'} n={n}", sk._hc_bwd_kernel if backward else sk._hc_fwd_kernel,
                   dict(n=n, N_PAD=N_PAD, K_PAD=K_PAD, BLOCK=BLOCK), 4)
        for kernel in ("pre_fwd", "pre_bwd", "post_fwd", "post_bwd"):
            N_PAD, BM, BC, warps = sk._stream_tiles(kernel, n, 768, 4)
            report(f"stream_{kernel.replace('_', ' ')} n={n} C=768", getattr(sk, f"_{kernel}_kernel"),
                   dict(n=n, N_PAD=N_PAD, BM=BM, BC=BC), warps)


def check_settings(c):
    """The first bad setting as one line, or None."""
    if c["only"] not in ("all", "kernels", "e2e", "compile", "tiles", "ptxas"):
        return f"--only={c['only']} is not known; use all, kernels, e2e, compile, tiles or ptxas"
    unknown = [k for k in c["tile_kernels"].split(",") if k not in TILE_KERNELS]
    if unknown:
        return (f"--tile_kernels={c['tile_kernels']}: {unknown[0]!r} is not a stream kernel; use a comma list of "
                f"{','.join(TILE_KERNELS)}")
    problem = check_compile_mode(c) or check_system(dict(device=c["device"], dtype="auto"))  # train.py's checks
    if problem:
        return problem
    if c["peers"] and importlib.util.find_spec("liger_kernel") is None:
        return "--peers=True times Liger-Kernel's LigerMHC, which is not installed here: pip install liger-kernel"
    models = c["models"].split(",")
    unknown = [m for m in models if m not in ("residual", "hc", "mhc", "mhc_lite")]
    if unknown:
        return (f"--models={c['models']}: {unknown[0]!r} is not a model here; use a comma list of residual, hc, "
                f"mhc, mhc_lite")
    if "residual" not in models:
        return f"--models={c['models']} leaves out residual, which every ratio is against; add it"
    problem = at_least(c, ("matrices", "tokens", "steps", "batch_size", "rounds", "tile_top"))
    if problem:
        return problem
    try:  # the models' settings: GPTConfig checks them
        for residual in set(models) | {"mhc"}:
            GPTConfig(residual=residual, **{k: c[k] for k in ("n_streams", "n_embd", "n_layer", "n_head", "block_size")})
    except ValueError as e:
        return str(e)
    return None


def resolve_device(c):
    """--device as "cuda", "cpu" or "none" (auto without a GPU); one GPU of several ("cuda:1")
    becomes the current one, and the rest of bench.py says "cuda"."""
    device = c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "none")
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
        device = "cuda"
    return device


def cold_cache():
    """A fresh, empty Inductor and Triton cache: (its folder, the environment that points there)."""
    cache = tempfile.mkdtemp(prefix="bench-compile-cache-")
    return cache, {"TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
                   "TRITON_CACHE_DIR": os.path.join(cache, "triton")}


def main(argv):
    c = settings(DEFAULTS, argv, check_settings, allow_files=False)
    device = resolve_device(c)
    if c["only"] == "ptxas":
        if os.environ.get("TRITON_INTERPRET") == "1":  # as mhc.ops reads it
            sys.exit("error: --only=ptxas compiles the kernels; unset TRITON_INTERPRET first")
        return ptxas_report()
    if device == "none":
        print("No CUDA GPU found: bench.py times GPU kernels and training steps, so there is nothing to "
              "measure here. (--device=cpu runs a tiny smoke version whose times mean nothing.)")
        return
    if device == "cpu":  # a smoke run: every code path, tiny sizes
        c.update(matrices=16, tokens=8, n_embd=64, n_layer=1, n_head=2, batch_size=2, block_size=16,
                 steps=2, compile=False)
    else:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        allow_tf32()
        # "1st step s" is a cold compile: a fresh Inductor and Triton cache, not one warmed by an
        # earlier run (a user's first run of train.py compiles cold too)
        os.environ.update(cold_cache()[1])
    if c["only"] in ("all", "kernels"):
        bench_kernels(c, device)
    if c["only"] in ("all", "e2e"):
        bench_e2e(c, device)
    if c["only"] == "compile":
        bench_compile(c, device)
    if c["only"] == "tiles":
        bench_tiles(c, device)


if __name__ == "__main__":
    main(sys.argv[1:])
