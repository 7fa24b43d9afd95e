"""
Triton kernels for the mHC hot path, registered with torch.library so that torch.compile sees
each one as a single opaque op (no graph break, no tracing of the Sinkhorn loop).

    sinkhorn(logits, iters=20)                 the projection of mhc.sinkhorn, forward and backward
    stream_pre(x, H_pre)                       layer_in = H_pre . x                 (Eq. 1, read)
    stream_post(x, y, H_res, H_post)           x_next = H_res . x + H_post^T y      (Eq. 1, write)
    mhc_pre(x, phi, alpha, b, iters)           an mHC sublayer's maps (Eqs. 2-4) and H_pre . x, in one pass
    mhc_post_pre(x, y, H_res, H_post, ...)     sublayer k's write fused with sublayer k+1's mhc_pre
    hc_pre(x, W, s, b)                         an HC sublayer's maps and H_pre . x, in one pass
    hc_post_pre(x, y, H_res, H_post, W, s, b)  sublayer k's write fused with sublayer k+1's hc_pre

mhc.py is the reference these are tested against (test_mhc.py, float64 oracle; on a CPU the
kernels run in Triton's interpreter, TRITON_INTERPRET=1).

The Sinkhorn works on the log-domain *potentials* of mhc.sinkhorn: with a (rows) and b (columns),

    b_j = logsumexp_i(L_ij - a_i)    (T_c: columns sum to 1)
    a_i = logsumexp_j(L_ij - b_j)    (T_r: rows sum to 1)          repeated `iters` times,
    H   = exp(L_ij - a_i - b_j).

That is the paper's iteration exactly (dividing by a sum is subtracting its log), stable at any
logit size. The backward is the exact gradient of the unrolled iterations: it recomputes the
forward on chip, keeping the 2 * iters potential vectors in registers (not in memory), and walks
back through them. A half-step y = x - logsumexp(x) has the vector-Jacobian product
g_x = g_y - exp(y) * sum(g_y) along the normalized axis, so each step needs only its own output.
"""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, kept (and its warning silenced)

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp

@triton.jit
def _lse(x, valid, axis: tl.constexpr):
    """logsumexp along `axis`, 0 where `valid` is false (padding: all -inf)."""
    m = tl.max(x, axis=axis)
    m = tl.where(m == float("-inf"), 0.0, m)
    if axis == 1:
        s = tl.sum(tl.exp(x - m[:, None, :]), axis=1)
    else:
        s = tl.sum(tl.exp(x - m[:, :, None]), axis=2)
    return tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)


@triton.jit
def _load_logits(L_ptr, pid, N, n: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """A [BLOCK, NP, NP] tile of matrices (padding = -inf) and the masks of its rows/columns."""
    m = pid * BLOCK + tl.arange(0, BLOCK)
    i = tl.arange(0, NP)
    offs = m[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    mask = (m[:, None, None] < N) & (i[None, :, None] < n) & (i[None, None, :] < n)
    L = tl.load(L_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    valid = (m[:, None] < N) & (i[None, :] < n)  # [BLOCK, NP]: a real row (or column)
    return L, offs, mask, valid


@triton.jit
def _sinkhorn(L, valid, ITERS: tl.constexpr):
    """H = Sinkhorn(L) for a [B, NP, NP] tile of logits (padding -inf, `valid` [B, NP])."""
    a = tl.zeros((L.shape[0], L.shape[1]), dtype=tl.float32)
    b = tl.zeros((L.shape[0], L.shape[1]), dtype=tl.float32)
    for _ in range(ITERS):
        b = _lse(L - a[:, :, None], valid, 1)   # columns
        a = _lse(L - b[:, None, :], valid, 2)   # rows
    return tl.exp(L - a[:, :, None] - b[:, None, :])


@triton.jit
def _sinkhorn_grad(L, valid, G, ITERS: tl.constexpr, TP: tl.constexpr):
    """dLoss/dL for H = Sinkhorn(L) given G = dLoss/dH (tiles [B, NP, NP]); TP >= ITERS."""
    # forward again, keeping the potentials of every iteration: hist[:, t, :] = a_t (or b_t)
    t_idx = tl.arange(0, TP)[None, :, None]
    a_hist = tl.zeros((L.shape[0], TP, L.shape[1]), dtype=tl.float32)
    b_hist = tl.zeros((L.shape[0], TP, L.shape[1]), dtype=tl.float32)
    a = tl.zeros((L.shape[0], L.shape[1]), dtype=tl.float32)
    b = tl.zeros((L.shape[0], L.shape[1]), dtype=tl.float32)
    for t in range(ITERS):
        b = _lse(L - a[:, :, None], valid, 1)
        a = _lse(L - b[:, None, :], valid, 2)
        a_hist = tl.where(t_idx == t, a[:, None, :], a_hist)
        b_hist = tl.where(t_idx == t, b[:, None, :], b_hist)
    # dL/dstate of the output: H = exp(state), so g_state = g_H * H
    G = G * tl.exp(L - a[:, :, None] - b[:, None, :])
    # walk back: (a_t, b_t) start at the last iteration's, which the loop above left in (a, b)
    for k in range(ITERS):
        t = ITERS - 1 - k
        a_prev = tl.sum(tl.where(t_idx == t - 1, a_hist, 0.0), axis=1)  # a_{t-1}; zeros before the first
        # row step t: its output is L - a_t - b_t
        P = tl.exp(L - a[:, :, None] - b[:, None, :])
        G = G - P * tl.sum(G, axis=2)[:, :, None]
        # column step t: its output is L - a_{t-1} - b_t
        P = tl.exp(L - a_prev[:, :, None] - b[:, None, :])
        G = G - P * tl.sum(G, axis=1)[:, None, :]
        a = a_prev
        b = tl.sum(tl.where(t_idx == t - 1, b_hist, 0.0), axis=1)
    return G


@triton.jit
def _sinkhorn_fwd_kernel(L_ptr, H_ptr, N, n: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr,
                         BLOCK: tl.constexpr):
    L, offs, mask, valid = _load_logits(L_ptr, tl.program_id(0), N, n, NP, BLOCK)
    tl.store(H_ptr + offs, _sinkhorn(L, valid, ITERS), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(L_ptr, G_ptr, dL_ptr, N, n: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr,
                         TP: tl.constexpr, BLOCK: tl.constexpr):
    L, offs, mask, valid = _load_logits(L_ptr, tl.program_id(0), N, n, NP, BLOCK)
    G = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dL_ptr + offs, _sinkhorn_grad(L, valid, G, ITERS, TP), mask=mask)


def _sinkhorn_launch_args(N, n, backward=False):
    """NP (n padded to a power of 2), matrices per program, grid. The backward takes half as
    many matrices: it also keeps the potentials' history in registers."""
    NP = triton.next_power_of_2(n)
    BLOCK = max(1, min(64, 512 // (NP * NP)) // (2 if backward else 1))
    return NP, BLOCK, (triton.cdiv(N, BLOCK),)


@torch.library.custom_op("mhc::sinkhorn_fwd", mutates_args=())
def sinkhorn_fwd(logits: torch.Tensor, iters: int) -> torch.Tensor:
    n = logits.shape[-1]
    L = logits.reshape(-1, n, n).contiguous()
    H = torch.empty(L.shape, dtype=torch.float32, device=L.device)
    NP, BLOCK, grid = _sinkhorn_launch_args(L.shape[0], n)
    if L.shape[0] > 0:
        _sinkhorn_fwd_kernel[grid](L, H, L.shape[0], n=n, NP=NP, ITERS=iters, BLOCK=BLOCK)
    return H.view(logits.shape)


@sinkhorn_fwd.register_fake
def _(logits, iters):
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)


@torch.library.custom_op("mhc::sinkhorn_bwd", mutates_args=())
def sinkhorn_bwd(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    n = logits.shape[-1]
    L = logits.reshape(-1, n, n).contiguous()
    G = grad.reshape(-1, n, n).contiguous()
    dL = torch.empty(L.shape, dtype=torch.float32, device=L.device)
    NP, BLOCK, grid = _sinkhorn_launch_args(L.shape[0], n, backward=True)
    if L.shape[0] > 0:
        _sinkhorn_bwd_kernel[grid](L, G, dL, L.shape[0], n=n, NP=NP, ITERS=iters,
                                   TP=triton.next_power_of_2(iters), BLOCK=BLOCK)
    return dL.view(logits.shape).to(logits.dtype)


@sinkhorn_bwd.register_fake
def _(grad, logits, iters):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _sinkhorn_setup(ctx, inputs, output):
    logits, iters = inputs
    ctx.save_for_backward(logits)  # only the logits: the iterates are recomputed on chip
    ctx.iters = iters


def _sinkhorn_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return sinkhorn_bwd(grad, logits, ctx.iters), None


torch.library.register_autograd("mhc::sinkhorn_fwd", _sinkhorn_backward, setup_context=_sinkhorn_setup)


def sinkhorn(logits, iters=20):
    """Same signature and meaning as mhc.sinkhorn: the doubly stochastic projection of the
    last two dims [..., n, n], `iters` column-then-row normalizations, fp32 result."""
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn: expected square matrices [..., n, n], got shape {tuple(logits.shape)}")
    return sinkhorn_fwd(logits.float(), int(iters))


# ----------------------------------------------------------------------------------------------
# Stream mixing: the read (pre) and the write (post) of Eq. 1, over x [M, n, C] (M tokens).
# Each program takes BM tokens; x is read once per C-chunk as a [BM, NP, BC] tile and the small
# n-axis sums stay in registers. The backward passes loop over C inside the program, so the
# coefficient gradients (sums over C) are reduced on chip and written once, without atomics.

@triton.jit
def _tile(ptr, m, c, M, C, n: tl.constexpr, NP: tl.constexpr):
    """Load the [BM, NP, BC] tile x[m, :, c] of a [M, n, C] tensor, as fp32 (padding = 0)."""
    i = tl.arange(0, NP)
    offs = m[:, None, None] * (n * C) + i[None, :, None] * C + c[None, None, :]
    mask = (m[:, None, None] < M) & (i[None, :, None] < n) & (c[None, None, :] < C)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@triton.jit
def _coef(ptr, m, M, n: tl.constexpr, NP: tl.constexpr, stride: tl.constexpr, step: tl.constexpr, start):
    """Load [BM, NP] coefficients ptr[m * stride + start + k * step] for k < n (padding = 0)."""
    k = tl.arange(0, NP)
    mask = (m[:, None] < M) & (k[None, :] < n)
    return tl.load(ptr + m[:, None] * stride + start + k[None, :] * step, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pre_fwd_kernel(x_ptr, h_ptr, out_ptr, M, C, n: tl.constexpr, NP: tl.constexpr,
                    BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    x, _, _ = _tile(x_ptr, m, c, M, C, n, NP)
    h = _coef(h_ptr, m, M, n, NP, n, 1, 0)                                  # H_pre [BM, NP]
    out = tl.sum(h[:, :, None] * x, axis=1)                                 # H_pre . x
    tl.store(out_ptr + m[:, None] * C + c[None, :], out, mask=(m[:, None] < M) & (c[None, :] < C))


@triton.jit
def _pre_bwd_kernel(x_ptr, h_ptr, g_ptr, dx_ptr, dh_ptr, M, C, n: tl.constexpr, NP: tl.constexpr,
                    BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    h = _coef(h_ptr, m, M, n, NP, n, 1, 0)
    dh = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        x, offs, mask = _tile(x_ptr, m, c, M, C, n, NP)
        g = tl.load(g_ptr + m[:, None] * C + c[None, :], mask=(m[:, None] < M) & (c[None, :] < C), other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, h[:, :, None] * g[:, None, :], mask=mask)   # dx = H_pre^T g
        dh += tl.sum(x * g[:, None, :], axis=2)                             # dH_pre = x . g
    k = tl.arange(0, NP)
    tl.store(dh_ptr + m[:, None] * n + k[None, :], dh, mask=(m[:, None] < M) & (k[None, :] < n))


@triton.jit
def _post_fwd_kernel(x_ptr, y_ptr, hres_ptr, hpost_ptr, out_ptr, M, C, n: tl.constexpr, NP: tl.constexpr,
                     BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    x, _, _ = _tile(x_ptr, m, c, M, C, n, NP)
    mc = (m[:, None] < M) & (c[None, :] < C)
    y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
    for i in tl.static_range(n):
        h_row = _coef(hres_ptr, m, M, n, NP, n * n, 1, i * n)               # H_res[i, :]
        h_post = tl.load(hpost_ptr + m * n + i, mask=m < M, other=0.0)
        out_i = tl.sum(h_row[:, :, None] * x, axis=1) + h_post[:, None] * y   # stream i of Eq. 1
        tl.store(out_ptr + m[:, None] * (n * C) + i * C + c[None, :], out_i, mask=mc)


@triton.jit
def _post_bwd_kernel(x_ptr, y_ptr, hres_ptr, hpost_ptr, g_ptr, dx_ptr, dy_ptr, dhres_ptr, dhpost_ptr, M, C,
                     n: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    k = tl.arange(0, NP)
    h_post = _coef(hpost_ptr, m, M, n, NP, n, 1, 0)
    dh_res = tl.zeros((BM, NP, NP), dtype=tl.float32)   # [token, i, j]
    dh_post = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = (m[:, None] < M) & (c[None, :] < C)
        g, offs, mask = _tile(g_ptr, m, c, M, C, n, NP)                     # dL/dx_next [BM, i, BC]
        y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        tl.store(dy_ptr + m[:, None] * C + c[None, :], tl.sum(h_post[:, :, None] * g, axis=1), mask=mc)
        dh_post += tl.sum(g * y[:, None, :], axis=2)                       # dH_post[i] = g_i . y
        for j in tl.static_range(n):
            h_col = _coef(hres_ptr, m, M, n, NP, n * n, n, j)               # H_res[:, j]
            tl.store(dx_ptr + m[:, None] * (n * C) + j * C + c[None, :],
                     tl.sum(h_col[:, :, None] * g, axis=1), mask=mc)       # dx_j = sum_i H_res[i, j] g_i
            x_j = tl.load(x_ptr + m[:, None] * (n * C) + j * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
            d_col = tl.sum(g * x_j[:, None, :], axis=2)                     # dH_res[:, j] = g_i . x_j
            dh_res += tl.where(k[None, None, :] == j, d_col[:, :, None], 0.0)
    mk = (m[:, None] < M) & (k[None, :] < n)
    tl.store(dhpost_ptr + m[:, None] * n + k[None, :], dh_post, mask=mk)
    offs_r = m[:, None, None] * (n * n) + k[None, :, None] * n + k[None, None, :]
    mask_r = (m[:, None, None] < M) & (k[None, :, None] < n) & (k[None, None, :] < n)
    tl.store(dhres_ptr + offs_r, dh_res, mask=mask_r)


def _stream_blocks(n, C, elems=2048):
    """Tile sizes: BM tokens x NP streams x BC channels of about `elems` values."""
    NP = triton.next_power_of_2(n)
    BC = min(triton.next_power_of_2(C), 128)
    BM = max(1, elems // (NP * BC))
    return NP, BM, BC


def _compute_dtype(x):
    """The sublayer's input is at least fp32, also when the stream is stored in bf16."""
    return torch.promote_types(x.dtype, torch.float32)


def _flat(x, n):
    """[..., n, C] -> contiguous [M, n, C]."""
    return x.reshape(-1, n, x.shape[-1]).contiguous()


def _f32(*params):
    """The kernels read the connections' parameters (phi, W, gates, biases) as contiguous fp32."""
    return [p.float().contiguous() for p in params]


@torch.library.custom_op("mhc::stream_pre", mutates_args=())
def stream_pre(x: torch.Tensor, H_pre: torch.Tensor) -> torch.Tensor:
    """layer_in = H_pre . x: x [..., n, C], H_pre [..., n] -> [..., C] (dtype of x)."""
    n, C = x.shape[-2:]
    xf, hf = _flat(x, n), H_pre.reshape(-1, n).float().contiguous()
    out = torch.empty(xf.shape[0], C, dtype=_compute_dtype(x), device=x.device)
    NP, BM, BC = _stream_blocks(n, C)
    if xf.shape[0] > 0:
        _pre_fwd_kernel[(triton.cdiv(xf.shape[0], BM), triton.cdiv(C, BC))](xf, hf, out, xf.shape[0], C, n=n, NP=NP, BM=BM, BC=BC)
    return out.view(*x.shape[:-2], C)


@stream_pre.register_fake
def _(x, H_pre):
    return x.new_empty((*x.shape[:-2], x.shape[-1]), dtype=_compute_dtype(x))


@torch.library.custom_op("mhc::stream_pre_bwd", mutates_args=())
def stream_pre_bwd(g: torch.Tensor, x: torch.Tensor, H_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, C = x.shape[-2:]
    xf, hf, gf = _flat(x, n), H_pre.reshape(-1, n).float().contiguous(), g.reshape(-1, C).contiguous()
    dx = torch.empty_like(xf)
    dh = torch.empty(xf.shape[0], n, dtype=torch.float32, device=x.device)
    NP, BM, BC = _stream_blocks(n, C)
    if xf.shape[0] > 0:
        _pre_bwd_kernel[(triton.cdiv(xf.shape[0], BM),)](xf, hf, gf, dx, dh, xf.shape[0], C, n=n, NP=NP, BM=BM, BC=BC)
    return dx.view(x.shape), dh.view(H_pre.shape).to(H_pre.dtype)


@stream_pre_bwd.register_fake
def _(g, x, H_pre):
    return torch.empty_like(x), torch.empty_like(H_pre)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # the stream ops' backward kernels need exactly their inputs


def _pre_backward(ctx, g):
    return stream_pre_bwd(g, *ctx.saved_tensors)


torch.library.register_autograd("mhc::stream_pre", _pre_backward, setup_context=_save_inputs)


@torch.library.custom_op("mhc::stream_post", mutates_args=())
def stream_post(x: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor) -> torch.Tensor:
    """x_next = H_res . x + H_post^T y: x [..., n, C], y [..., C], H_res [..., n, n], H_post [..., n]."""
    n, C = x.shape[-2:]
    xf, yf = _flat(x, n), y.reshape(-1, C).contiguous()
    rf, pf = H_res.reshape(-1, n, n).float().contiguous(), H_post.reshape(-1, n).float().contiguous()
    out = torch.empty_like(xf)
    NP, BM, BC = _stream_blocks(n, C)
    if xf.shape[0] > 0:
        _post_fwd_kernel[(triton.cdiv(xf.shape[0], BM), triton.cdiv(C, BC))](xf, yf, rf, pf, out, xf.shape[0], C,
                                                                               n=n, NP=NP, BM=BM, BC=BC)
    return out.view(x.shape)


@stream_post.register_fake
def _(x, y, H_res, H_post):
    return torch.empty_like(x)


@torch.library.custom_op("mhc::stream_post_bwd", mutates_args=())
def stream_post_bwd(g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor,
                    H_post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, C = x.shape[-2:]
    xf, yf, gf = _flat(x, n), y.reshape(-1, C).contiguous(), _flat(g, n)
    rf, pf = H_res.reshape(-1, n, n).float().contiguous(), H_post.reshape(-1, n).float().contiguous()
    dx, dy = torch.empty_like(xf), torch.empty_like(yf)
    dres = torch.empty(rf.shape, dtype=torch.float32, device=x.device)
    dpost = torch.empty(pf.shape, dtype=torch.float32, device=x.device)
    NP, BM, BC = _stream_blocks(n, C, elems=1024)  # g, x and the n x n sums: a smaller tile
    if xf.shape[0] > 0:
        _post_bwd_kernel[(triton.cdiv(xf.shape[0], BM),)](xf, yf, rf, pf, gf, dx, dy, dres, dpost, xf.shape[0], C,
                                                          n=n, NP=NP, BM=BM, BC=BC)
    return (dx.view(x.shape), dy.view(y.shape), dres.view(H_res.shape).to(H_res.dtype),
            dpost.view(H_post.shape).to(H_post.dtype))


@stream_post_bwd.register_fake
def _(g, x, y, H_res, H_post):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(H_res), torch.empty_like(H_post)


def _post_backward(ctx, g):
    return stream_post_bwd(g, *ctx.saved_tensors)


torch.library.register_autograd("mhc::stream_post", _post_backward, setup_context=_save_inputs)


# ----------------------------------------------------------------------------------------------
# The fused mHC "pre" step (mhc.py Eqs. 2-4 and the read of Eq. 1) in one kernel per direction:
# read each token's n x C state, project it with phi to the 2n + n^2 raw coefficients, divide
# by the RMS, gate, sigmoid / 2 sigmoid / Sinkhorn, and write layer_in = H_pre . x.
# Column layout of phi (and of the saved coefficients h): [pre (n) | post (n) | res (n*n, i*n + j)];
# the kernels load phi's rows into a padded layout (_phi_blocks) so the projection is two GEMMs.

# The projection GEMMs stay fp32-accurate: "tf32x3" is three TF32 tensor-core products
# (hi*hi + hi*lo + lo*hi); MHC_DOT_PRECISION=ieee makes them plain fp32 FMAs (to compare).
DOT_PRECISION = tl.constexpr(os.environ.get("MHC_DOT_PRECISION", "tf32x3"))


@triton.jit
def _onehot(ROWS: tl.constexpr, COLS: tl.constexpr, START: tl.constexpr):
    """[ROWS, COLS] selector with S[q, START + q] = 1: moves coefficients between the padded
    layout of phi's rows (see _phi_blocks) and [.., n]-shaped tiles."""
    q = tl.arange(0, ROWS)[:, None]
    k = tl.arange(0, COLS)[None, :]
    return tl.where(k == q + START, 1.0, 0.0)


@triton.jit
def _phi_blocks(phi_ptr, k, NC, n: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, NR: tl.constexpr):
    """Rows k of phi [nC, K] as the two GEMM operands of the projection, in a padded layout:
    [BK, 16] = [pre (NP) | post (NP) | zeros] and [BK, NR] = [res (NP*NP, i*NP + j) | zeros]."""
    mk = k[:, None] < NC
    q = tl.arange(0, 16)
    pre, post = q < n, (q >= NP) & (q - NP < n)
    col = tl.where(pre, q, n + q - NP)
    p_pp = tl.load(phi_ptr + k[:, None] * K + col[None, :], mask=mk & (pre | post)[None, :], other=0.0)
    qq = tl.arange(0, NR)
    i, j = qq // NP, qq % NP
    real = (qq < NP * NP) & (i < n) & (j < n)
    p_res = tl.load(phi_ptr + k[:, None] * K + 2 * n + (i * n + j)[None, :], mask=mk & real[None, :], other=0.0)
    return p_pp, p_res


@triton.jit
def _unpad(pp, res, NP: tl.constexpr, NR: tl.constexpr):
    """Padded coefficients ([BM, 16], [BM, NR]) -> pre [BM, NP], post [BM, NP], res [BM, NP, NP]."""
    pre = tl.sum(pp[:, None, :] * _onehot(NP, 16, 0)[None, :, :], axis=2)
    post = tl.sum(pp[:, None, :] * _onehot(NP, 16, NP)[None, :, :], axis=2)
    if NP * NP == NR:
        res = tl.reshape(res, (pp.shape[0], NP, NP))
    else:  # n <= 2: the res block is padded to the 16 columns tl.dot needs
        res = tl.reshape(tl.sum(res[:, None, :] * _onehot(NP * NP, NR, 0)[None, :, :], axis=2), (pp.shape[0], NP, NP))
    return pre, post, res


@triton.jit
def _pad(pre, post, res, NP: tl.constexpr, NR: tl.constexpr):
    """The inverse of _unpad: [BM, NP], [BM, NP], [BM, NP, NP] -> ([BM, 16], [BM, NR])."""
    pp = (tl.sum(pre[:, :, None] * _onehot(NP, 16, 0)[None, :, :], axis=1)
          + tl.sum(post[:, :, None] * _onehot(NP, 16, NP)[None, :, :], axis=1))
    res = tl.reshape(res, (pre.shape[0], NP * NP))
    if NP * NP != NR:
        res = tl.sum(res[:, :, None] * _onehot(NP * NP, NR, 0)[None, :, :], axis=1)
    return pp, res


@triton.jit
def _mhc_maps(h_pre, h_post, h_res, alpha_ptr, b_ptr, m, M, n: tl.constexpr, NP: tl.constexpr):
    """Eqs. 3-4 on the (RMS-scaled) coefficients: H_pre, H_post [BM, NP] and the masked
    Sinkhorn logits [BM, NP, NP] (-inf padding) with the mask of valid rows."""
    q = tl.arange(0, NP)
    qn = q < n
    a_pre, a_post, a_res = tl.load(alpha_ptr), tl.load(alpha_ptr + 1), tl.load(alpha_ptr + 2)
    b_pre = tl.load(b_ptr + q, mask=qn, other=0.0)
    b_post = tl.load(b_ptr + n + q, mask=qn, other=0.0)
    b_res = tl.load(b_ptr + 2 * n + q[:, None] * n + q[None, :], mask=qn[:, None] & qn[None, :], other=0.0)
    H_pre = tl.sigmoid(a_pre * h_pre + b_pre[None, :])
    H_post = 2.0 * tl.sigmoid(a_post * h_post + b_post[None, :])
    cell = (m[:, None, None] < M) & qn[None, :, None] & qn[None, None, :]
    L = tl.where(cell, a_res * h_res + b_res[None, :, :], float("-inf"))
    valid = (m[:, None] < M) & qn[None, :]
    return H_pre, H_post, L, valid


@triton.jit
def _mhc_pre_fwd_kernel(x_ptr, phi_ptr, alpha_ptr, b_ptr, out_ptr, hpre_ptr, hpost_ptr, hres_ptr, h_ptr, r_ptr,
                        M, C, n: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, NR: tl.constexpr, ITERS: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    NC = n * C
    # Eq. 2: v . phi as two fp32 GEMMs against the padded phi (pre/post block, res block) and
    # sum(v^2), in one pass over the flattened state v = vec(x)
    acc_pp = tl.zeros((BM, 16), dtype=tl.float32)
    acc_res = tl.zeros((BM, NR), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, NC, BK):
        k = k0 + tl.arange(0, BK)
        v = tl.load(x_ptr + m[:, None] * NC + k[None, :], mask=(m[:, None] < M) & (k[None, :] < NC), other=0.0).to(tl.float32)
        p_pp, p_res = _phi_blocks(phi_ptr, k, NC, n, NP, K, NR)
        acc_pp = tl.dot(v, p_pp, acc_pp, input_precision=DOT_PRECISION)
        acc_res = tl.dot(v, p_res, acc_res, input_precision=DOT_PRECISION)
        ss += tl.sum(v * v, axis=1)
    H_pre = _pre_maps(acc_pp, acc_res, ss, NC, m, M, alpha_ptr, b_ptr, hpre_ptr, hpost_ptr, hres_ptr, h_ptr, r_ptr,
                      n, NP, K, NR, ITERS)
    _pre_read(x_ptr, out_ptr, H_pre, m, M, C, n, NP, BC)


@triton.jit
def _pre_maps(acc_pp, acc_res, ss, NC, m, M, alpha_ptr, b_ptr, hpre_ptr, hpost_ptr, hres_ptr, h_ptr, r_ptr,
              n: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, NR: tl.constexpr, ITERS: tl.constexpr):
    """From the projection (acc) and sum(v^2) of BM tokens: Eqs. 2-4, stored with the scaled
    coefficients h and r for the backward; returns H_pre [BM, NP]."""
    r = 1.0 / tl.sqrt(ss / NC + 1e-6)                      # 1 / rms(v), eps inside the root
    h_pre, h_post, h_res = _unpad(acc_pp * r[:, None], acc_res * r[:, None], NP, NR)
    H_pre, H_post, L, valid = _mhc_maps(h_pre, h_post, h_res, alpha_ptr, b_ptr, m, M, n, NP)
    H_res = _sinkhorn(L, valid, ITERS)
    q = tl.arange(0, NP)
    mq = (m[:, None] < M) & (q[None, :] < n)
    tl.store(hpre_ptr + m[:, None] * n + q[None, :], H_pre, mask=mq)
    tl.store(hpost_ptr + m[:, None] * n + q[None, :], H_post, mask=mq)
    cell = mq[:, :, None] & (q[None, None, :] < n)
    tl.store(hres_ptr + m[:, None, None] * (n * n) + q[None, :, None] * n + q[None, None, :], H_res, mask=cell)
    tl.store(h_ptr + m[:, None] * K + q[None, :], h_pre, mask=mq)
    tl.store(h_ptr + m[:, None] * K + n + q[None, :], h_post, mask=mq)
    tl.store(h_ptr + m[:, None, None] * K + 2 * n + q[None, :, None] * n + q[None, None, :], h_res, mask=cell)
    tl.store(r_ptr + m, r, mask=m < M)
    return H_pre


@triton.jit
def _pre_read(x_ptr, out_ptr, H_pre, m, M, C, n: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):
    """The read of Eq. 1, layer_in = H_pre . x: a second pass over x, mostly from L2."""
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        x, _, _ = _tile(x_ptr, m, c, M, C, n, NP)
        tl.store(out_ptr + m[:, None] * C + c[None, :], tl.sum(H_pre[:, :, None] * x, axis=1),
                 mask=(m[:, None] < M) & (c[None, :] < C))


@triton.jit
def _pick(t, i, NP: tl.constexpr):
    """Column i of a [BM, NP] tile, as [BM]."""
    return tl.sum(tl.where(tl.arange(0, NP)[None, :] == i, t, 0.0), axis=1)


@triton.jit
def _write_stream(x, y, i, m, M, c, mc, C, hres0_ptr, hpost0_ptr, xn_ptr, n: tl.constexpr, NP: tl.constexpr):
    """Stream i of a write x_next = H_res x + H_post^T y on a channel tile (x [BM, NP, BC], y
    [BM, BC]): stored, and returned as stored (fp32 of e.g. a bf16 stream) for the next pre step."""
    h_row = _coef(hres0_ptr, m, M, n, NP, n * n, 1, i * n)                 # H_res[i, :]
    h_post = tl.load(hpost0_ptr + m * n + i, mask=m < M, other=0.0)
    v = (tl.sum(h_row[:, :, None] * x, axis=1) + h_post[:, None] * y).to(xn_ptr.dtype.element_ty)
    tl.store(xn_ptr + m[:, None] * (n * C) + i * C + c[None, :], v, mask=mc)
    return v.to(tl.float32)


@triton.jit
def _write_bwd(g, i, x, y, H_post, m, M, hres0_ptr, dx, dy, dh_res, dh_post, n: tl.constexpr, NP: tl.constexpr):
    """Stream i of the write's backward on a channel tile, given g = dLoss/dx_next[:, i, c]:
    dx_j += H_res[i, j] g, dy += H_post[i] g, dH_res[i, :] += x . g, dH_post[i] += y . g."""
    k = tl.arange(0, NP)
    h_row = _coef(hres0_ptr, m, M, n, NP, n * n, 1, i * n)                 # H_res[i, :]
    dx += h_row[:, :, None] * g[:, None, :]
    dy += _pick(H_post, i, NP)[:, None] * g
    dh_res += tl.where(k[None, :, None] == i, tl.sum(x * g[:, None, :], axis=2)[:, None, :], 0.0)
    dh_post += tl.where(k[None, :] == i, tl.sum(g * y, axis=1)[:, None], 0.0)
    return dx, dy, dh_res, dh_post


@triton.jit
def _write_bwd_store(dh_res, dh_post, m, M, dhres0_ptr, dhpost0_ptr, n: tl.constexpr, NP: tl.constexpr):
    k = tl.arange(0, NP)
    mk = (m[:, None] < M) & (k[None, :] < n)
    tl.store(dhpost0_ptr + m[:, None] * n + k[None, :], dh_post, mask=mk)
    offs_r = m[:, None, None] * (n * n) + k[None, :, None] * n + k[None, None, :]
    tl.store(dhres0_ptr + offs_r, dh_res, mask=mk[:, :, None] & (k[None, None, :] < n))


@triton.jit
def _post_pre_fwd_kernel(x_ptr, y_ptr, hres0_ptr, hpost0_ptr, xn_ptr, phi_ptr, alpha_ptr, b_ptr, out_ptr, hpre_ptr,
                         hpost_ptr, hres_ptr, h_ptr, r_ptr, M, C, n: tl.constexpr, NP: tl.constexpr,
                         K: tl.constexpr, NR: tl.constexpr, ITERS: tl.constexpr, BM: tl.constexpr,
                         BC: tl.constexpr):
    """Sublayer k's write x_next = H_res x + H_post^T y fused with sublayer k+1's pre step: the
    projection of x_next accumulates from registers as it is written, so x_next is not read back
    from memory for it (only, from L2, for the read H_pre . x_next)."""
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    NC = n * C
    acc_pp = tl.zeros((BM, 16), dtype=tl.float32)
    acc_res = tl.zeros((BM, NR), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = (m[:, None] < M) & (c[None, :] < C)
        x, _, _ = _tile(x_ptr, m, c, M, C, n, NP)
        y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        for i in range(n):
            v = _write_stream(x, y, i, m, M, c, mc, C, hres0_ptr, hpost0_ptr, xn_ptr, n, NP)   # x_next, stream i
            p_pp, p_res = _phi_blocks(phi_ptr, i * C + c, NC, n, NP, K, NR)        # phi rows i*C + c
            acc_pp = tl.dot(v, p_pp, acc_pp, input_precision=DOT_PRECISION)
            acc_res = tl.dot(v, p_res, acc_res, input_precision=DOT_PRECISION)
            ss += tl.sum(v * v, axis=1)
    H_pre = _pre_maps(acc_pp, acc_res, ss, NC, m, M, alpha_ptr, b_ptr, hpre_ptr, hpost_ptr, hres_ptr, h_ptr, r_ptr,
                      n, NP, K, NR, ITERS)
    tl.debug_barrier()  # this program's x_next stores are visible to its own loads below
    _pre_read(xn_ptr, out_ptr, H_pre, m, M, C, n, NP, BC)


@triton.jit
def _dh_pre(x_ptr, gin_ptr, ghpre_ptr, m, M, C, n: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):
    """dH_pre = x . g_in (+ any gradient H_pre itself received), [BM, NP]: a pass over x and g_in."""
    q = tl.arange(0, NP)
    dH_pre = tl.load(ghpre_ptr + m[:, None] * n + q[None, :], mask=(m[:, None] < M) & (q[None, :] < n), other=0.0)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        x, _, _ = _tile(x_ptr, m, c, M, C, n, NP)
        g = tl.load(gin_ptr + m[:, None] * C + c[None, :], mask=(m[:, None] < M) & (c[None, :] < C), other=0.0).to(tl.float32)
        dH_pre += tl.sum(x * g[:, None, :], axis=2)
    return dH_pre


@triton.jit
def _pre_bwd_coefs(x_ptr, phi_ptr, alpha_ptr, b_ptr, h_ptr, r_ptr, gin_ptr, ghpre_ptr, ghpost_ptr, ghres_ptr, dacc_ptr,
                   dz_ptr, m, M, C, n: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, NR: tl.constexpr,
                   ITERS: tl.constexpr, TP: tl.constexpr, BC: tl.constexpr):
    """The coefficient part of one pre step's backward (x: its input stream), for BM tokens:
    stores per token dz (gradient of the gate inputs z = alpha h + b) and dacc (of acc = v . phi);
    returns dacc in phi's padded layout and coef, so that the state's gradient is
    dv = dacc . phi^T + coef v (+ the read's H_pre^T g_in, added by the caller)."""
    NC = n * C
    q = tl.arange(0, NP)
    mq = (m[:, None] < M) & (q[None, :] < n)
    cell = mq[:, :, None] & (q[None, None, :] < n)
    offs_res = m[:, None, None] * K + 2 * n + q[None, :, None] * n + q[None, None, :]
    h_pre = tl.load(h_ptr + m[:, None] * K + q[None, :], mask=mq, other=0.0)
    h_post = tl.load(h_ptr + m[:, None] * K + n + q[None, :], mask=mq, other=0.0)
    h_res = tl.load(h_ptr + offs_res, mask=cell, other=0.0)
    r = tl.load(r_ptr + m, mask=m < M, other=1.0)
    H_pre, H_post, L, valid = _mhc_maps(h_pre, h_post, h_res, alpha_ptr, b_ptr, m, M, n, NP)
    dH_pre = _dh_pre(x_ptr, gin_ptr, ghpre_ptr, m, M, C, n, NP, BC)
    # back through Eq. 4 to the gate inputs z = alpha * h + b
    dz_pre = dH_pre * H_pre * (1.0 - H_pre)                                    # sigmoid'
    dz_post = tl.load(ghpost_ptr + m[:, None] * n + q[None, :], mask=mq, other=0.0) * H_post * (1.0 - 0.5 * H_post)
    G_res = tl.load(ghres_ptr + m[:, None, None] * (n * n) + q[None, :, None] * n + q[None, None, :], mask=cell, other=0.0)
    dz_res = tl.where(cell, _sinkhorn_grad(L, valid, G_res, ITERS, TP), 0.0)
    tl.store(dz_ptr + m[:, None] * K + q[None, :], dz_pre, mask=mq)
    tl.store(dz_ptr + m[:, None] * K + n + q[None, :], dz_post, mask=mq)
    tl.store(dz_ptr + offs_res, dz_res, mask=cell)
    # Eq. 3 then Eq. 2: dh = alpha dz; h = acc * r with acc = v . phi and r = (mean v^2 + eps)^-1/2
    dh_pre, dh_post = tl.load(alpha_ptr) * dz_pre, tl.load(alpha_ptr + 1) * dz_post
    dh_res = tl.load(alpha_ptr + 2) * dz_res
    d_r = (tl.sum(dh_pre * h_pre, axis=1) + tl.sum(dh_post * h_post, axis=1)
           + tl.sum(tl.sum(dh_res * h_res, axis=2), axis=1)) / r              # dLoss/dr
    da_pre, da_post = dh_pre * r[:, None], dh_post * r[:, None]                # dLoss/dacc
    da_res = dh_res * r[:, None, None]
    tl.store(dacc_ptr + m[:, None] * K + q[None, :], da_pre, mask=mq)
    tl.store(dacc_ptr + m[:, None] * K + n + q[None, :], da_post, mask=mq)
    tl.store(dacc_ptr + offs_res, da_res, mask=cell)
    da_pp, da_res = _pad(da_pre, da_post, da_res, NP, NR)  # dacc in phi's padded layout
    return da_pp, da_res, -d_r * r * r * r / NC                                # dr/dv = -r^3 v / NC


@triton.jit
def _mhc_pre_bwd_kernel(x_ptr, phi_ptr, alpha_ptr, b_ptr, h_ptr, r_ptr, hpre_ptr, gin_ptr, ghpre_ptr, ghpost_ptr,
                        ghres_ptr, dx_ptr, dacc_ptr, dz_ptr, M, C, n: tl.constexpr, NP: tl.constexpr,
                        K: tl.constexpr, NR: tl.constexpr, ITERS: tl.constexpr, TP: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    NC = n * C
    da_pp, da_res, coef = _pre_bwd_coefs(x_ptr, phi_ptr, alpha_ptr, b_ptr, h_ptr, r_ptr, gin_ptr, ghpre_ptr, ghpost_ptr,
                                         ghres_ptr, dacc_ptr, dz_ptr, m, M, C, n, NP, K, NR, ITERS, TP, BC)
    # dv = dacc . phi^T + coef v, plus the read's H_pre^T g_in; one pass over the flattened state
    for k0 in range(0, NC, BK):
        k = k0 + tl.arange(0, BK)
        mk = (m[:, None] < M) & (k[None, :] < NC)
        v = tl.load(x_ptr + m[:, None] * NC + k[None, :], mask=mk, other=0.0).to(tl.float32)
        p_pp, p_res = _phi_blocks(phi_ptr, k, NC, n, NP, K, NR)
        dv = (tl.dot(da_pp, tl.trans(p_pp), input_precision=DOT_PRECISION)
              + tl.dot(da_res, tl.trans(p_res), input_precision=DOT_PRECISION) + coef[:, None] * v)
        stream, chan = k // C, k % C
        g = tl.load(gin_ptr + m[:, None] * C + chan[None, :], mask=mk, other=0.0).to(tl.float32)
        hp = tl.load(hpre_ptr + m[:, None] * n + stream[None, :], mask=mk, other=0.0)
        tl.store(dx_ptr + m[:, None] * NC + k[None, :], dv + hp * g, mask=mk)


@triton.jit
def _post_pre_bwd_kernel(x_ptr, y_ptr, hres0_ptr, hpost0_ptr, xn_ptr, phi_ptr, alpha_ptr, b_ptr, h_ptr, r_ptr,
                         hpre_ptr, gin_ptr, ghpre_ptr, ghpost_ptr, ghres_ptr, gnext_ptr, dx_ptr, dy_ptr, dhres0_ptr,
                         dhpost0_ptr, dacc_ptr, dz_ptr, M, C, n: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
                         NR: tl.constexpr, ITERS: tl.constexpr, TP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """The backward of _post_pre_fwd_kernel in one kernel: the pre step of sublayer k+1 (input
    x_next), then the write of sublayer k (x_next = H_res x + H_post^T y). The gradient of x_next
    (g_next from later sublayers, plus the pre step's) is made and used a channel tile at a time,
    all n streams together, and never goes to memory."""
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    NC = n * C
    da_pp, da_res, coef = _pre_bwd_coefs(xn_ptr, phi_ptr, alpha_ptr, b_ptr, h_ptr, r_ptr, gin_ptr, ghpre_ptr,
                                         ghpost_ptr, ghres_ptr, dacc_ptr, dz_ptr, m, M, C, n, NP, K, NR, ITERS, TP, BC)
    k = tl.arange(0, NP)
    mk = (m[:, None] < M) & (k[None, :] < n)
    H_pre = tl.load(hpre_ptr + m[:, None] * n + k[None, :], mask=mk, other=0.0)
    H_post = tl.load(hpost0_ptr + m[:, None] * n + k[None, :], mask=mk, other=0.0)           # sublayer k's
    dh_res = tl.zeros((BM, NP, NP), dtype=tl.float32)   # [token, i, j]
    dh_post = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = (m[:, None] < M) & (c[None, :] < C)
        g_in = tl.load(gin_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        x, offs, mask = _tile(x_ptr, m, c, M, C, n, NP)                                    # sublayer k's input
        dx = tl.zeros((BM, NP, BC), dtype=tl.float32)
        dy = tl.zeros((BM, BC), dtype=tl.float32)
        for i in range(n):
            # stream i of x_next's gradient: the pre step's dv (+ H_pre^T g_in) + g_next
            v = tl.load(xn_ptr + m[:, None] * NC + i * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
            p_pp, p_res = _phi_blocks(phi_ptr, i * C + c, NC, n, NP, K, NR)
            g = (tl.dot(da_pp, tl.trans(p_pp), input_precision=DOT_PRECISION)
                 + tl.dot(da_res, tl.trans(p_res), input_precision=DOT_PRECISION)
                 + coef[:, None] * v + _pick(H_pre, i, NP)[:, None] * g_in
                 + tl.load(gnext_ptr + m[:, None] * NC + i * C + c[None, :], mask=mc, other=0.0).to(tl.float32))
            dx, dy, dh_res, dh_post = _write_bwd(g, i, x, y, H_post, m, M, hres0_ptr, dx, dy, dh_res, dh_post, n, NP)
        tl.store(dx_ptr + offs, dx, mask=mask)
        tl.store(dy_ptr + m[:, None] * C + c[None, :], dy, mask=mc)
    _write_bwd_store(dh_res, dh_post, m, M, dhres0_ptr, dhpost0_ptr, n, NP)


PRE_WARPS = 8  # warps per program of the fused pre step (see _pre_blocks)


def _pre_blocks(n, C):
    """Tiles of the fused pre step: BM tokens (>= 16 for tl.dot); NR columns of the res block of
    the padded phi (n*n, at least 16); BK of the nC inputs per step of the projection GEMMs; BC
    channels for the read. With 8 warps these compile for sm_90 without register spills for
    n = 1 ... 8 (python bench.py --only=ptxas)."""
    NP = triton.next_power_of_2(n)
    NR = max(16, NP * NP)
    BM, BK = 16, 32
    BC = min(triton.next_power_of_2(C), 4096 // (BM * NP))  # the read's [BM, NP, BC] tile
    return NP, NR, BM, BK, BC


def _post_pre_blocks(n, C):
    """Tiles of the fused post+pre kernels (mHC and HC): BM = 16 tokens (tl.dot) and half of
    mhc_pre's channel tile, since each step holds x, y and the n streams' GEMM operands (the
    sweep in BENCHMARKS.md); NP = n padded."""
    NP, _, BM, _, BC = _pre_blocks(n, C)
    return NP, BM, max(16, BC // 2)


@torch.library.custom_op("mhc::mhc_pre", mutates_args=())
def mhc_pre(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, iters: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer_in, H_pre, H_post, H_res, h, r) of one mHC sublayer; h and r are for the backward."""
    n, C = x.shape[-2:]
    K = 2 * n + n * n
    xf = _flat(x, n)
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    out = torch.empty(M, C, dtype=_compute_dtype(x), device=x.device)
    H_pre, H_post, H_res = torch.empty(M, n, **f32), torch.empty(M, n, **f32), torch.empty(M, n, n, **f32)
    h, r = torch.empty(M, K, **f32), torch.empty(M, **f32)
    NP, NR, BM, BK, BC = _pre_blocks(n, C)
    if M > 0:
        _mhc_pre_fwd_kernel[(triton.cdiv(M, BM),)](xf, *_f32(phi, alpha, b), out, H_pre, H_post, H_res, h, r, M, C,
                                                   n=n, NP=NP, K=K, NR=NR, ITERS=iters, BM=BM, BK=BK, BC=BC,
                                                   num_warps=PRE_WARPS)
    lead = x.shape[:-2]
    return (out.view(*lead, C), H_pre.view(*lead, n), H_post.view(*lead, n), H_res.view(*lead, n, n),
            h.view(*lead, K), r.view(lead))


@mhc_pre.register_fake
def _mhc_pre_fake(x, phi, alpha, b, iters):
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty((*lead, C), dtype=_compute_dtype(x)), torch.empty(*lead, n, **f32), torch.empty(*lead, n, **f32),
            torch.empty(*lead, n, n, **f32), torch.empty(*lead, 2 * n + n * n, **f32), torch.empty(lead, **f32))


def _zeros_if_none(g, x, *shape, dtype=torch.float32):
    """An output that was not used has no gradient (None): zeros of its shape [*lead, *shape]."""
    return g if g is not None else torch.zeros(*x.shape[:-2], *shape, dtype=dtype, device=x.device)


def _pre_grads(g_in, g_pre, g_post, g_res, x):
    """The gradients a pre step's backward kernel reads, as contiguous [M, ...] fp32 tensors
    (g_in: the sublayer input's dtype) with zeros for unused outputs."""
    n, C = x.shape[-2:]
    M = x.numel() // (n * C)
    grads = (_zeros_if_none(g_in, x, C, dtype=_compute_dtype(x)), _zeros_if_none(g_pre, x, n),
             _zeros_if_none(g_post, x, n), _zeros_if_none(g_res, x, n, n))
    return [g.reshape(M, *shape).contiguous() for g, shape in zip(grads, ((C,), (n,), (n,), (n, n)))]


def _pre_reductions(x, h, dacc, dz, phi, alpha, b):
    """The reductions over tokens of a pre step's backward: dphi = v^T dacc (a GEMM, v = vec(x)),
    db = sum dz, dalpha = sum dz * h per map."""
    n = x.shape[-2]
    dphi = x.reshape(dacc.shape[0], -1).float().t() @ dacc
    dzh = dz * h.reshape(dz.shape)
    dalpha = torch.stack([dzh[:, :n].sum(), dzh[:, n:2 * n].sum(), dzh[:, 2 * n:].sum()])
    return dphi.to(phi.dtype), dalpha.to(alpha.dtype), dz.sum(0).to(b.dtype)


@torch.library.custom_op("mhc::mhc_pre_bwd", mutates_args=())
def mhc_pre_bwd(g_in: torch.Tensor, g_pre: torch.Tensor, g_post: torch.Tensor, g_res: torch.Tensor,
                x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                r: torch.Tensor, H_pre: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dacc, dz): the state's gradient, and per token the gradients of acc = v . phi and of
    the gate inputs z = alpha h + b (reduced over tokens by _pre_reductions). The g_* are as
    _pre_grads makes them."""
    n, C = x.shape[-2:]
    K = 2 * n + n * n
    xf = _flat(x, n)
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty_like(xf)
    dacc, dz = torch.empty(M, K, **f32), torch.empty(M, K, **f32)
    NP, NR, BM, BK, BC = _pre_blocks(n, C)
    if M > 0:
        _mhc_pre_bwd_kernel[(triton.cdiv(M, BM),)](
            xf, *_f32(phi, alpha, b), h.reshape(M, K).contiguous(), r.reshape(M).contiguous(),
            H_pre.reshape(M, n).contiguous(), g_in, g_pre, g_post, g_res, dx, dacc, dz, M, C, n=n, NP=NP, K=K, NR=NR,
            ITERS=iters, TP=triton.next_power_of_2(iters), BM=BM, BK=BK, BC=BC, num_warps=PRE_WARPS)
    return dx.view(x.shape), dacc, dz


@mhc_pre_bwd.register_fake
def _(g_in, g_pre, g_post, g_res, x, phi, alpha, b, h, r, H_pre, iters):
    M = x.numel() // (x.shape[-1] * x.shape[-2])
    K = phi.shape[-1]
    return torch.empty_like(x), x.new_empty((M, K), dtype=torch.float32), x.new_empty((M, K), dtype=torch.float32)


def _mhc_pre_setup(ctx, inputs, output):
    x, phi, alpha, b, iters = inputs
    _, H_pre, _, _, h, r = output
    ctx.mark_non_differentiable(h, r)  # internal: saved for the backward only
    ctx.save_for_backward(x, phi, alpha, b, h, r, H_pre)
    ctx.iters = iters


def _mhc_pre_backward(ctx, g_in, g_pre, g_post, g_res, g_h, g_r):
    x, phi, alpha, b, h, r, H_pre = ctx.saved_tensors
    dx, dacc, dz = mhc_pre_bwd(*_pre_grads(g_in, g_pre, g_post, g_res, x), x, phi, alpha, b, h, r, H_pre, ctx.iters)
    return dx, *_pre_reductions(x, h, dacc, dz, phi, alpha, b), None


torch.library.register_autograd("mhc::mhc_pre", _mhc_pre_backward, setup_context=_mhc_pre_setup)


@torch.library.custom_op("mhc::mhc_post_pre", mutates_args=())
def mhc_post_pre(x: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor, phi: torch.Tensor,
                 alpha: torch.Tensor, b: torch.Tensor, iters: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sublayer k's write and sublayer k+1's pre step in one kernel: returns (x_next, and the
    outputs of mhc_pre(x_next, phi, alpha, b, iters)). The same numbers as stream_post then
    mhc_pre."""
    n, C = x.shape[-2:]
    K = 2 * n + n * n
    xf, yf = _flat(x, n), y.reshape(-1, C).contiguous()
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    x_next = torch.empty_like(xf)
    out = torch.empty(M, C, dtype=_compute_dtype(x), device=x.device)
    H_pre, H_post2, H_res2 = torch.empty(M, n, **f32), torch.empty(M, n, **f32), torch.empty(M, n, n, **f32)
    h, r = torch.empty(M, K, **f32), torch.empty(M, **f32)
    NR = _pre_blocks(n, C)[1]
    NP, BM, BC = _post_pre_blocks(n, C)
    if M > 0:
        _post_pre_fwd_kernel[(triton.cdiv(M, BM),)](
            xf, yf, H_res.reshape(M, n, n).float().contiguous(), H_post.reshape(M, n).float().contiguous(), x_next,
            *_f32(phi, alpha, b), out, H_pre, H_post2, H_res2, h, r,
            M, C, n=n, NP=NP, K=K, NR=NR, ITERS=iters, BM=BM, BC=BC, num_warps=PRE_WARPS)
    lead = x.shape[:-2]
    return (x_next.view(x.shape), out.view(*lead, C), H_pre.view(*lead, n), H_post2.view(*lead, n),
            H_res2.view(*lead, n, n), h.view(*lead, K), r.view(lead))


@mhc_post_pre.register_fake
def _(x, y, H_res, H_post, phi, alpha, b, iters):
    return (torch.empty_like(x), *_mhc_pre_fake(x, phi, alpha, b, iters))


def _post_pre_setup(ctx, inputs, output):
    x, y, H_res, H_post, phi, alpha, b, iters = inputs
    x_next, _, H_pre, _, _, h, r = output
    ctx.mark_non_differentiable(h, r)
    ctx.save_for_backward(x, y, H_res, H_post, x_next, phi, alpha, b, h, r, H_pre)
    ctx.iters = iters


@torch.library.custom_op("mhc::mhc_post_pre_bwd", mutates_args=())
def mhc_post_pre_bwd(g_next: torch.Tensor, g_in: torch.Tensor, g_pre: torch.Tensor, g_post: torch.Tensor,
                     g_res: torch.Tensor, x: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor,
                     x_next: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                     r: torch.Tensor, H_pre: torch.Tensor, iters: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dH_res, dH_post) of the write and (dacc, dz) of the pre step (see mhc_pre_bwd), in
    one kernel; g_next is the gradient x_next received from later sublayers."""
    n, C = x.shape[-2:]
    K = 2 * n + n * n
    xf, yf, xn = _flat(x, n), y.reshape(-1, C).contiguous(), _flat(x_next, n)
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    dx, dy = torch.empty_like(xf), torch.empty_like(yf)
    dres, dpost = torch.empty(M, n, n, **f32), torch.empty(M, n, **f32)
    dacc, dz = torch.empty(M, K, **f32), torch.empty(M, K, **f32)
    NR = _pre_blocks(n, C)[1]
    NP, BM, BC = _post_pre_blocks(n, C)
    if M > 0:
        _post_pre_bwd_kernel[(triton.cdiv(M, BM),)](
            xf, yf, H_res.reshape(M, n, n).float().contiguous(), H_post.reshape(M, n).float().contiguous(), xn,
            *_f32(phi, alpha, b), h.reshape(M, K).contiguous(), r.reshape(M).contiguous(),
            H_pre.reshape(M, n).contiguous(), g_in, g_pre, g_post, g_res, _flat(g_next, n), dx, dy, dres, dpost, dacc,
            dz, M, C, n=n, NP=NP, K=K, NR=NR, ITERS=iters, TP=triton.next_power_of_2(iters), BM=BM, BC=BC,
            num_warps=PRE_WARPS)
    return (dx.view(x.shape), dy.view(y.shape), dres.view(H_res.shape).to(H_res.dtype),
            dpost.view(H_post.shape).to(H_post.dtype), dacc, dz)


@mhc_post_pre_bwd.register_fake
def _(g_next, g_in, g_pre, g_post, g_res, x, y, H_res, H_post, x_next, phi, alpha, b, h, r, H_pre, iters):
    M = x.numel() // (x.shape[-1] * x.shape[-2])
    K = phi.shape[-1]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(H_res), torch.empty_like(H_post),
            torch.empty(M, K, **f32), torch.empty(M, K, **f32))


def _post_pre_backward(ctx, g_next, g_in, g_pre, g_post, g_res, g_h, g_r):
    x, y, H_res, H_post, x_next, phi, alpha, b, h, r, H_pre = ctx.saved_tensors
    # the pre step of sublayer k+1 (its input is x_next), then the write of sublayer k, in one kernel
    g_next = torch.zeros_like(x_next) if g_next is None else g_next
    dx, dy, dres, dpost, dacc, dz = mhc_post_pre_bwd(
        g_next, *_pre_grads(g_in, g_pre, g_post, g_res, x_next), x, y, H_res, H_post, x_next, phi, alpha, b, h, r,
        H_pre, ctx.iters)
    return dx, dy, dres, dpost, *_pre_reductions(x_next, h, dacc, dz, phi, alpha, b), None


torch.library.register_autograd("mhc::mhc_post_pre", _post_pre_backward, setup_context=_post_pre_setup)


# ----------------------------------------------------------------------------------------------
# The fused HC "pre" step (mhc.HyperConnection.maps and the read of Eq. 1) in one kernel per
# direction. HC's coefficients come per stream: each stream's C-vector, RMS-normalized, is
# projected by W [C, n + 2] to [pre, post, res column], squashed by tanh, scaled by s and added to
# the static part b. So the projection is one GEMM over the M*n stream rows: a [BM*NP, BC] tile of
# x against a [BC, QP] tile of W (QP: the n + 2 columns padded to 16 for tl.dot).

@triton.jit
def _hc_w(W_ptr, c, C, Q: tl.constexpr, QP: tl.constexpr):
    """Rows c of W [C, Q] as a [BC, QP] tile (padding = 0)."""
    q = tl.arange(0, QP)
    return tl.load(W_ptr + c[:, None] * Q + q[None, :], mask=(c[:, None] < C) & (q[None, :] < Q), other=0.0)


@triton.jit
def _hc_res_select(NP: tl.constexpr, QP: tl.constexpr):
    """[NP, QP] selector S[i, 2 + i] = 1: column 2 + i of a stream's coefficients is H_res[i, stream]."""
    i = tl.arange(0, NP)[:, None]
    q = tl.arange(0, QP)[None, :]
    return tl.where(q == i + 2, 1.0, 0.0)


@triton.jit
def _hc_maps(acc, ss, C, m, M, s_ptr, b_ptr, hpre_ptr, hpost_ptr, hres_ptr, u_ptr, r_ptr, n: tl.constexpr,
             NP: tl.constexpr, Q: tl.constexpr, QP: tl.constexpr):
    """From the per-stream projections acc = x_j . W [BM, NP, QP] and sum(x_j^2) [BM, NP] of BM
    tokens: HC's maps, stored with u and r for the backward; returns H_pre [BM, NP]."""
    j = tl.arange(0, NP)
    q = tl.arange(0, QP)
    r = 1.0 / tl.sqrt(ss / C + 1e-6)                                  # 1 / rms(x_j), eps inside the root
    u = acc * r[:, :, None]                                           # rmsnorm(x_j) . W
    d = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), from tl.sigmoid: runs compiled and in the interpreter
    mj = (m[:, None] < M) & (j[None, :] < n)
    mjq = mj[:, :, None] & (q[None, None, :] < Q)
    tl.store(u_ptr + m[:, None, None] * (n * Q) + j[None, :, None] * Q + q[None, None, :], u, mask=mjq)
    tl.store(r_ptr + m[:, None] * n + j[None, :], r, mask=mj)
    # the maps: static part + s * tanh(dynamic part)
    s_pre, s_post, s_res = tl.load(s_ptr), tl.load(s_ptr + 1), tl.load(s_ptr + 2)
    b_pre = tl.load(b_ptr + j, mask=j < n, other=0.0)
    b_post = tl.load(b_ptr + n + j, mask=j < n, other=0.0)
    H_pre = b_pre[None, :] + s_pre * tl.sum(tl.where(q[None, None, :] == 0, d, 0.0), axis=2)
    H_post = b_post[None, :] + s_post * tl.sum(tl.where(q[None, None, :] == 1, d, 0.0), axis=2)
    d_res = tl.sum(d[:, :, None, :] * _hc_res_select(NP, QP)[None, None, :, :], axis=3)  # [token, j, i]
    offs_res = m[:, None, None] * (n * n) + j[None, None, :] * n + j[None, :, None]      # H_res[i, j] at [., j, i]
    cell = mj[:, :, None] & (j[None, None, :] < n)
    b_res = tl.load(b_ptr + 2 * n + j[None, None, :] * n + j[None, :, None], mask=cell, other=0.0)
    tl.store(hpre_ptr + m[:, None] * n + j[None, :], H_pre, mask=mj)
    tl.store(hpost_ptr + m[:, None] * n + j[None, :], H_post, mask=mj)
    tl.store(hres_ptr + offs_res, b_res + s_res * d_res, mask=cell)
    return H_pre


@triton.jit
def _hc_pre_fwd_kernel(x_ptr, W_ptr, s_ptr, b_ptr, out_ptr, hpre_ptr, hpost_ptr, hres_ptr, u_ptr, r_ptr, M, C,
                       n: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr, QP: tl.constexpr, BM: tl.constexpr,
                       BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    # per stream: x_j . W and sum(x_j^2), one pass over x
    acc = tl.zeros((BM * NP, QP), dtype=tl.float32)
    ss = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        x, _, _ = _tile(x_ptr, m, c, M, C, n, NP)
        acc = tl.dot(tl.reshape(x, (BM * NP, BC)), _hc_w(W_ptr, c, C, Q, QP), acc, input_precision=DOT_PRECISION)
        ss += tl.sum(x * x, axis=2)
    H_pre = _hc_maps(tl.reshape(acc, (BM, NP, QP)), ss, C, m, M, s_ptr, b_ptr, hpre_ptr, hpost_ptr, hres_ptr, u_ptr,
                     r_ptr, n, NP, Q, QP)
    _pre_read(x_ptr, out_ptr, H_pre, m, M, C, n, NP, BC)


@triton.jit
def _hc_post_pre_fwd_kernel(x_ptr, y_ptr, hres0_ptr, hpost0_ptr, xn_ptr, W_ptr, s_ptr, b_ptr, out_ptr, hpre_ptr,
                            hpost_ptr, hres_ptr, u_ptr, r_ptr, M, C, n: tl.constexpr, NP: tl.constexpr,
                            Q: tl.constexpr, QP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """Sublayer k's write fused with sublayer k+1's HC pre step, as _post_pre_fwd_kernel for mHC:
    each stream of x_next is projected from registers as it is written."""
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    j = tl.arange(0, NP)
    acc = tl.zeros((BM, NP, QP), dtype=tl.float32)
    ss = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = (m[:, None] < M) & (c[None, :] < C)
        x, _, _ = _tile(x_ptr, m, c, M, C, n, NP)
        y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        w = _hc_w(W_ptr, c, C, Q, QP)
        for i in range(n):
            v = _write_stream(x, y, i, m, M, c, mc, C, hres0_ptr, hpost0_ptr, xn_ptr, n, NP)   # x_next, stream i
            acc += tl.where(j[None, :, None] == i, tl.dot(v, w, input_precision=DOT_PRECISION)[:, None, :], 0.0)
            ss += tl.where(j[None, :] == i, tl.sum(v * v, axis=1)[:, None], 0.0)
    H_pre = _hc_maps(acc, ss, C, m, M, s_ptr, b_ptr, hpre_ptr, hpost_ptr, hres_ptr, u_ptr, r_ptr, n, NP, Q, QP)
    tl.debug_barrier()  # this program's x_next stores are visible to its own loads below
    _pre_read(xn_ptr, out_ptr, H_pre, m, M, C, n, NP, BC)


@triton.jit
def _hc_bwd_coefs(x_ptr, s_ptr, u_ptr, r_ptr, gin_ptr, ghpre_ptr, ghpost_ptr, ghres_ptr, dhpre_ptr, dacc_ptr, m, M,
                  C, n: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr, QP: tl.constexpr, BC: tl.constexpr):
    """The coefficient part of one HC pre step's backward (x: its input stream), for BM tokens:
    stores per token the full gradient of H_pre and dacc (of acc = x_j . W); returns dacc
    [BM, NP, QP] and coef [BM, NP], so that stream j's gradient is dacc_j . W^T + coef_j x_j
    (+ the read's H_pre[j] g_in, added by the caller)."""
    j = tl.arange(0, NP)
    q = tl.arange(0, QP)
    mj = (m[:, None] < M) & (j[None, :] < n)
    mjq = mj[:, :, None] & (q[None, None, :] < Q)
    dH_pre = _dh_pre(x_ptr, gin_ptr, ghpre_ptr, m, M, C, n, NP, BC)
    tl.store(dhpre_ptr + m[:, None] * n + j[None, :], dH_pre, mask=mj)
    # gradient of d = tanh(u) per stream: [s_pre dH_pre, s_post dH_post, s_res dH_res[:, j]]
    s_pre, s_post, s_res = tl.load(s_ptr), tl.load(s_ptr + 1), tl.load(s_ptr + 2)
    g_post = tl.load(ghpost_ptr + m[:, None] * n + j[None, :], mask=mj, other=0.0)
    cell = mj[:, :, None] & (j[None, None, :] < n)
    g_res = tl.load(ghres_ptr + m[:, None, None] * (n * n) + j[None, None, :] * n + j[None, :, None], mask=cell,
                    other=0.0)                                                           # [token, j, i]
    dd = (tl.where(q[None, None, :] == 0, s_pre * dH_pre[:, :, None], 0.0)
          + tl.where(q[None, None, :] == 1, s_post * g_post[:, :, None], 0.0)
          + s_res * tl.sum(g_res[:, :, :, None] * _hc_res_select(NP, QP)[None, None, :, :], axis=2))
    u = tl.load(u_ptr + m[:, None, None] * (n * Q) + j[None, :, None] * Q + q[None, None, :], mask=mjq, other=0.0)
    r = tl.load(r_ptr + m[:, None] * n + j[None, :], mask=mj, other=1.0)
    d = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    du = dd * (1.0 - d * d)                                   # tanh'
    dacc = du * r[:, :, None]                                 # u = acc * r, acc = x_j . W
    tl.store(dacc_ptr + m[:, None, None] * (n * Q) + j[None, :, None] * Q + q[None, None, :], dacc, mask=mjq)
    return dacc, -tl.sum(du * u, axis=2) * r * r / C          # dLoss/dr * dr/dx = -r^3 x / C, with acc = u / r


@triton.jit
def _hc_pre_bwd_kernel(x_ptr, W_ptr, s_ptr, u_ptr, r_ptr, hpre_ptr, gin_ptr, ghpre_ptr, ghpost_ptr, ghres_ptr,
                       dx_ptr, dhpre_ptr, dacc_ptr, M, C, n: tl.constexpr, NP: tl.constexpr, Q: tl.constexpr,
                       QP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    j = tl.arange(0, NP)
    dacc, coef = _hc_bwd_coefs(x_ptr, s_ptr, u_ptr, r_ptr, gin_ptr, ghpre_ptr, ghpost_ptr, ghres_ptr, dhpre_ptr,
                               dacc_ptr, m, M, C, n, NP, Q, QP, BC)
    h_pre = tl.load(hpre_ptr + m[:, None] * n + j[None, :], mask=(m[:, None] < M) & (j[None, :] < n), other=0.0)
    dacc2 = tl.reshape(dacc, (BM * NP, QP))
    # dx_j = dacc_j . W^T + coef_j x_j + H_pre[j] g_in: a second pass
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        x, offs, mask = _tile(x_ptr, m, c, M, C, n, NP)
        g = tl.load(gin_ptr + m[:, None] * C + c[None, :], mask=(m[:, None] < M) & (c[None, :] < C), other=0.0).to(tl.float32)
        proj = tl.dot(dacc2, tl.trans(_hc_w(W_ptr, c, C, Q, QP)), input_precision=DOT_PRECISION)
        dx = tl.reshape(proj, (BM, NP, BC)) + coef[:, :, None] * x + h_pre[:, :, None] * g[:, None, :]
        tl.store(dx_ptr + offs, dx, mask=mask)


@triton.jit
def _hc_post_pre_bwd_kernel(x_ptr, y_ptr, hres0_ptr, hpost0_ptr, xn_ptr, W_ptr, s_ptr, u_ptr, r_ptr, hpre_ptr,
                            gin_ptr, ghpre_ptr, ghpost_ptr, ghres_ptr, gnext_ptr, dx_ptr, dy_ptr, dhres0_ptr,
                            dhpost0_ptr, dhpre_ptr, dacc_ptr, M, C, n: tl.constexpr, NP: tl.constexpr,
                            Q: tl.constexpr, QP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """The backward of _hc_post_pre_fwd_kernel in one kernel, as _post_pre_bwd_kernel for mHC."""
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    NC = n * C
    j = tl.arange(0, NP)
    dacc, coef = _hc_bwd_coefs(xn_ptr, s_ptr, u_ptr, r_ptr, gin_ptr, ghpre_ptr, ghpost_ptr, ghres_ptr, dhpre_ptr,
                               dacc_ptr, m, M, C, n, NP, Q, QP, BC)
    mj = (m[:, None] < M) & (j[None, :] < n)
    H_pre = tl.load(hpre_ptr + m[:, None] * n + j[None, :], mask=mj, other=0.0)
    H_post = tl.load(hpost0_ptr + m[:, None] * n + j[None, :], mask=mj, other=0.0)           # sublayer k's
    dh_res = tl.zeros((BM, NP, NP), dtype=tl.float32)   # [token, i, j]
    dh_post = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = (m[:, None] < M) & (c[None, :] < C)
        g_in = tl.load(gin_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        x, offs, mask = _tile(x_ptr, m, c, M, C, n, NP)                                    # sublayer k's input
        w_t = tl.trans(_hc_w(W_ptr, c, C, Q, QP))
        dx = tl.zeros((BM, NP, BC), dtype=tl.float32)
        dy = tl.zeros((BM, BC), dtype=tl.float32)
        for i in range(n):
            # stream i of x_next's gradient: the pre step's (+ H_pre[i] g_in) + g_next
            v = tl.load(xn_ptr + m[:, None] * NC + i * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
            dacc_i = tl.sum(tl.where(j[None, :, None] == i, dacc, 0.0), axis=1)                # [BM, QP]
            g = (tl.dot(dacc_i, w_t, input_precision=DOT_PRECISION)
                 + _pick(coef, i, NP)[:, None] * v + _pick(H_pre, i, NP)[:, None] * g_in
                 + tl.load(gnext_ptr + m[:, None] * NC + i * C + c[None, :], mask=mc, other=0.0).to(tl.float32))
            dx, dy, dh_res, dh_post = _write_bwd(g, i, x, y, H_post, m, M, hres0_ptr, dx, dy, dh_res, dh_post, n, NP)
        tl.store(dx_ptr + offs, dx, mask=mask)
        tl.store(dy_ptr + m[:, None] * C + c[None, :], dy, mask=mc)
    _write_bwd_store(dh_res, dh_post, m, M, dhres0_ptr, dhpost0_ptr, n, NP)


def _hc_blocks(n, C):
    """Tiles of the fused HC pre step: BM tokens x NP streams = 64 GEMM rows, BC channels, QP
    coefficient columns (n + 2, padded to at least 16 for tl.dot)."""
    NP = triton.next_power_of_2(n)
    return NP, triton.next_power_of_2(max(16, n + 2)), max(1, 64 // NP), min(64, max(16, triton.next_power_of_2(C)))


@torch.library.custom_op("mhc::hc_pre", mutates_args=())
def hc_pre(x: torch.Tensor, W: torch.Tensor, s: torch.Tensor, b: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer_in, H_pre, H_post, H_res, u, r) of one HC sublayer (mhc.HyperConnection.maps, then
    H_pre . x); u (the pre-tanh coefficients) and r (1 / rms per stream) are for the backward."""
    n, C = x.shape[-2:]
    Q = n + 2
    xf = _flat(x, n)
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    out = torch.empty(M, C, dtype=_compute_dtype(x), device=x.device)
    H_pre, H_post, H_res = torch.empty(M, n, **f32), torch.empty(M, n, **f32), torch.empty(M, n, n, **f32)
    u, r = torch.empty(M, n, Q, **f32), torch.empty(M, n, **f32)
    NP, QP, BM, BC = _hc_blocks(n, C)
    if M > 0:
        _hc_pre_fwd_kernel[(triton.cdiv(M, BM),)](xf, *_f32(W, s, b), out, H_pre, H_post, H_res, u, r, M, C,
                                                  n=n, NP=NP, Q=Q, QP=QP, BM=BM, BC=BC, num_warps=PRE_WARPS)
    lead = x.shape[:-2]
    return (out.view(*lead, C), H_pre.view(*lead, n), H_post.view(*lead, n), H_res.view(*lead, n, n),
            u.view(*lead, n, Q), r.view(*lead, n))


@hc_pre.register_fake
def _hc_pre_fake(x, W, s, b):
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty((*lead, C), dtype=_compute_dtype(x)), torch.empty(*lead, n, **f32), torch.empty(*lead, n, **f32),
            torch.empty(*lead, n, n, **f32), torch.empty(*lead, n, n + 2, **f32), torch.empty(*lead, n, **f32))


@torch.library.custom_op("mhc::hc_pre_bwd", mutates_args=())
def hc_pre_bwd(g_in: torch.Tensor, g_pre: torch.Tensor, g_post: torch.Tensor, g_res: torch.Tensor, x: torch.Tensor,
               W: torch.Tensor, s: torch.Tensor, u: torch.Tensor, r: torch.Tensor, H_pre: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dH_pre, dacc): the stream's gradient, and per token the full gradient of H_pre and of
    the per-stream projections acc = x_j . W (reduced over tokens by _hc_reductions). The g_* are
    as _pre_grads makes them."""
    n, C = x.shape[-2:]
    Q = n + 2
    xf = _flat(x, n)
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    dx, dH_pre, dacc = torch.empty_like(xf), torch.empty(M, n, **f32), torch.empty(M, n, Q, **f32)
    NP, QP, BM, BC = _hc_blocks(n, C)
    if M > 0:
        _hc_pre_bwd_kernel[(triton.cdiv(M, BM),)](
            xf, *_f32(W, s), u.reshape(M, n, Q).contiguous(), r.reshape(M, n).contiguous(),
            H_pre.reshape(M, n).contiguous(), g_in, g_pre, g_post, g_res, dx, dH_pre, dacc,
            M, C, n=n, NP=NP, Q=Q, QP=QP, BM=BM, BC=BC, num_warps=PRE_WARPS)
    return dx.view(x.shape), dH_pre, dacc


@hc_pre_bwd.register_fake
def _(g_in, g_pre, g_post, g_res, x, W, s, u, r, H_pre):
    n = x.shape[-2]
    M = x.numel() // (x.shape[-1] * n)
    f32 = dict(dtype=torch.float32, device=x.device)
    return torch.empty_like(x), torch.empty(M, n, **f32), torch.empty(M, n, n + 2, **f32)


def _hc_pre_setup(ctx, inputs, output):
    x, W, s, b = inputs
    _, H_pre, _, _, u, r = output
    ctx.mark_non_differentiable(u, r)  # internal: saved for the backward only
    ctx.save_for_backward(x, W, s, u, r, H_pre)


def _hc_reductions(x, u, dH_pre, dacc, g_post, g_res, W, s):
    """The reductions over tokens of an HC pre step's backward: dW = x^T dacc over every stream row
    (a GEMM), ds = the maps' gradients against tanh(u), db = those gradients summed."""
    n, C = x.shape[-2:]
    dW = x.reshape(-1, C).float().t() @ dacc.reshape(-1, n + 2)
    d = torch.tanh(u.reshape(-1, n, n + 2))
    ds = torch.stack([(dH_pre * d[..., 0]).sum(), (g_post * d[..., 1]).sum(),
                      (g_res.transpose(-1, -2) * d[..., 2:]).sum()])
    db = torch.cat([dH_pre.sum(0), g_post.sum(0), g_res.sum(0).flatten()])
    return dW.to(W.dtype), ds.to(s.dtype), db


def _hc_pre_backward(ctx, g_in, g_pre, g_post, g_res, g_u, g_r):
    x, W, s, u, r, H_pre = ctx.saved_tensors
    g_in, g_pre, g_post, g_res = _pre_grads(g_in, g_pre, g_post, g_res, x)
    dx, dH_pre, dacc = hc_pre_bwd(g_in, g_pre, g_post, g_res, x, W, s, u, r, H_pre)
    return dx, *_hc_reductions(x, u, dH_pre, dacc, g_post, g_res, W, s)


torch.library.register_autograd("mhc::hc_pre", _hc_pre_backward, setup_context=_hc_pre_setup)


@torch.library.custom_op("mhc::hc_post_pre", mutates_args=())
def hc_post_pre(x: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor, W: torch.Tensor,
                s: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sublayer k's write and sublayer k+1's HC pre step in one kernel: (x_next, and the outputs
    of hc_pre(x_next, W, s, b)). The same numbers as stream_post then hc_pre."""
    n, C = x.shape[-2:]
    Q = n + 2
    xf, yf = _flat(x, n), y.reshape(-1, C).contiguous()
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    x_next = torch.empty_like(xf)
    out = torch.empty(M, C, dtype=_compute_dtype(x), device=x.device)
    H_pre, H_post2, H_res2 = torch.empty(M, n, **f32), torch.empty(M, n, **f32), torch.empty(M, n, n, **f32)
    u, r = torch.empty(M, n, Q, **f32), torch.empty(M, n, **f32)
    NP, BM, BC = _post_pre_blocks(n, C)
    if M > 0:
        _hc_post_pre_fwd_kernel[(triton.cdiv(M, BM),)](
            xf, yf, H_res.reshape(M, n, n).float().contiguous(), H_post.reshape(M, n).float().contiguous(), x_next,
            *_f32(W, s, b), out, H_pre, H_post2, H_res2, u, r,
            M, C, n=n, NP=NP, Q=Q, QP=_hc_blocks(n, C)[1], BM=BM, BC=BC, num_warps=PRE_WARPS)
    lead = x.shape[:-2]
    return (x_next.view(x.shape), out.view(*lead, C), H_pre.view(*lead, n), H_post2.view(*lead, n),
            H_res2.view(*lead, n, n), u.view(*lead, n, Q), r.view(*lead, n))


@hc_post_pre.register_fake
def _(x, y, H_res, H_post, W, s, b):
    return (torch.empty_like(x), *_hc_pre_fake(x, W, s, b))


@torch.library.custom_op("mhc::hc_post_pre_bwd", mutates_args=())
def hc_post_pre_bwd(g_next: torch.Tensor, g_in: torch.Tensor, g_pre: torch.Tensor, g_post: torch.Tensor,
                    g_res: torch.Tensor, x: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor,
                    x_next: torch.Tensor, W: torch.Tensor, s: torch.Tensor, u: torch.Tensor, r: torch.Tensor,
                    H_pre: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dH_res, dH_post) of the write and (dH_pre, dacc) of the HC pre step (see
    hc_pre_bwd), in one kernel; g_next is the gradient x_next received from later sublayers."""
    n, C = x.shape[-2:]
    Q = n + 2
    xf, yf, xn = _flat(x, n), y.reshape(-1, C).contiguous(), _flat(x_next, n)
    M = xf.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    dx, dy = torch.empty_like(xf), torch.empty_like(yf)
    dres, dpost = torch.empty(M, n, n, **f32), torch.empty(M, n, **f32)
    dH_pre, dacc = torch.empty(M, n, **f32), torch.empty(M, n, Q, **f32)
    NP, BM, BC = _post_pre_blocks(n, C)
    if M > 0:
        _hc_post_pre_bwd_kernel[(triton.cdiv(M, BM),)](
            xf, yf, H_res.reshape(M, n, n).float().contiguous(), H_post.reshape(M, n).float().contiguous(), xn,
            *_f32(W, s), u.reshape(M, n, Q).contiguous(),
            r.reshape(M, n).contiguous(), H_pre.reshape(M, n).contiguous(), g_in, g_pre, g_post, g_res,
            _flat(g_next, n), dx, dy, dres, dpost, dH_pre, dacc, M, C, n=n, NP=NP, Q=Q, QP=_hc_blocks(n, C)[1],
            BM=BM, BC=BC, num_warps=PRE_WARPS)
    return (dx.view(x.shape), dy.view(y.shape), dres.view(H_res.shape).to(H_res.dtype),
            dpost.view(H_post.shape).to(H_post.dtype), dH_pre, dacc)


@hc_post_pre_bwd.register_fake
def _(g_next, g_in, g_pre, g_post, g_res, x, y, H_res, H_post, x_next, W, s, u, r, H_pre):
    n = x.shape[-2]
    M = x.numel() // (x.shape[-1] * n)
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(H_res), torch.empty_like(H_post),
            torch.empty(M, n, **f32), torch.empty(M, n, n + 2, **f32))


def _hc_post_pre_setup(ctx, inputs, output):
    x, y, H_res, H_post, W, s, b = inputs
    x_next, _, H_pre, _, _, u, r = output
    ctx.mark_non_differentiable(u, r)
    ctx.save_for_backward(x, y, H_res, H_post, x_next, W, s, u, r, H_pre)


def _hc_post_pre_backward(ctx, g_next, g_in, g_pre, g_post, g_res, g_u, g_r):
    x, y, H_res, H_post, x_next, W, s, u, r, H_pre = ctx.saved_tensors
    g_next = torch.zeros_like(x_next) if g_next is None else g_next
    g_in, g_pre, g_post, g_res = _pre_grads(g_in, g_pre, g_post, g_res, x_next)
    dx, dy, dres, dpost, dH_pre, dacc = hc_post_pre_bwd(g_next, g_in, g_pre, g_post, g_res, x, y, H_res, H_post, x_next,
                                                        W, s, u, r, H_pre)
    return dx, dy, dres, dpost, *_hc_reductions(x_next, u, dH_pre, dacc, g_post, g_res, W, s)


torch.library.register_autograd("mhc::hc_post_pre", _hc_post_pre_backward, setup_context=_hc_post_pre_setup)
