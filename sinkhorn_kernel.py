"""
Triton kernels for the mHC hot path, registered with torch.library so that torch.compile sees
each one as a single opaque op (no graph break, no tracing of the Sinkhorn loop).

    sinkhorn(logits, iters=20)           the projection of mhc.sinkhorn, forward and backward
    coefficients(h, alpha, b, n, iters)  mHC's gates and Sinkhorn, mhc.coefficients    (Eqs. 3-4)
    hc_gates(p, s, b)                    HC's maps b + s * tanh(p), mhc.hc_gates
    stream_pre(x, H_pre)                 layer_in = H_pre . x                 (Eq. 1, read)
    stream_post(x, y, H_res, H_post)     x_next = H_res . x + H_post^T y      (Eq. 1, write)

The rest of a connection (the maps' projection and RMS) stays plain PyTorch in mhc.py, which
torch.compile turns into a few fused kernels of its own.

mhc.py is the reference these are tested against (test_mhc.py, float64 oracle; on a CPU the
kernels run in Triton's interpreter, TRITON_INTERPRET=1).

The Sinkhorn is the paper's iteration: with K = exp(L - max L) and scalings u (rows) and c
(columns), starting from u = 1,

    c_j = 1 / sum_i K_ij u_i      (T_c: columns sum to 1)
    u_i = 1 / sum_j K_ij c_j      (T_r: rows sum to 1)          repeated `iters` times,
    H   = u_i K_ij c_j,

a few multiply-adds and one division a step. exp(L - max L) underflows to 0 once a logit is some
87 below the largest of its matrix, and a row or column of zeros has no scaling; so a block of
matrices whose logits spread over more than 50 runs the same iteration in the log domain
instead, on the potentials a = -log u and b = -log c (a logsumexp a step), which is stable at
any logit size. The backward is the exact gradient of the unrolled iterations: it recomputes the
forward on chip, keeping the row scaling that enters each step in a scratch buffer in global
memory (iters vectors a matrix, written once and read back once), and walks back through them,
recomputing each step's column scaling from it. A half-step
that normalizes a state P along one axis has the vector-Jacobian product g_x = g_y - P * sum(g_y)
(with respect to log P) along that axis, so each step needs only its own output.
"""
import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp. Triton's tiles have power-of-2 sizes: N_PAD is n padded to one (the padding is
# masked). Each program takes BLOCK matrices, a [BLOCK, N_PAD, N_PAD] tile; x and y are the row
# and column scalings u, c (exp domain) or the potentials a, b (log domain), [BLOCK, N_PAD] each.

SPREAD = tl.constexpr(50.0)  # the largest logit spread (max - min of a matrix) a block runs in the exp domain


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
def _inv(s, valid):
    """1 / s, 0 where `valid` is false."""
    return tl.where(valid, 1.0 / tl.where(valid, s, 1.0), 0.0)


@triton.jit
def _matrices(pid, N, n: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """The program's BLOCK matrices: their indices m, and the [BLOCK, N_PAD, N_PAD] offsets and mask
    of their entries in an [N, n, n] tensor."""
    m = pid * BLOCK + tl.arange(0, BLOCK)
    i = tl.arange(0, N_PAD)
    offs = m[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    mask = (m[:, None, None] < N) & (i[None, :, None] < n) & (i[None, None, :] < n)
    return m, offs, mask


@triton.jit
def _prepare(L, m, mask, N, n: tl.constexpr, N_PAD: tl.constexpr):
    """For a tile of logits (padding = -inf): the masks of its rows/columns, K = exp(L - max) per
    matrix, and whether the block runs in the exp domain (every spread below SPREAD)."""
    i = tl.arange(0, N_PAD)
    valid = (m[:, None] < N) & (i[None, :] < n)  # [BLOCK, N_PAD]: a real row (or column)
    hi = tl.max(tl.max(L, axis=2), axis=1)
    lo = tl.min(tl.min(tl.where(mask, L, float("inf")), axis=2), axis=1)
    real = m < N
    K = tl.exp(L - tl.where(real, hi, 0.0)[:, None, None])  # padding: exp(-inf) = 0
    exp_domain = tl.max(tl.where(real, hi - lo, 0.0), axis=0) < SPREAD
    return K, valid, exp_domain


@triton.jit
def _load_logits(L_ptr, pid, N, n: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """A tile of logits (padding = -inf), its offsets and masks, and what _prepare gives."""
    m, offs, mask = _matrices(pid, N, n, N_PAD, BLOCK)
    L = tl.load(L_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    K, valid, exp_domain = _prepare(L, m, mask, N, n, N_PAD)
    return L, K, offs, mask, valid, exp_domain


@triton.jit
def _start(valid, exp_domain):
    """x before the first step: u = 1, or a = 0."""
    return tl.where(exp_domain, tl.where(valid, 1.0, 0.0), 0.0)


@triton.jit
def _columns(L, K, x, valid, exp_domain):
    """T_c: the column scaling y that makes every column of the state sum to 1."""
    if exp_domain:
        y = _inv(tl.sum(K * x[:, :, None], axis=1), valid)
    else:
        y = _lse(L - x[:, :, None], valid, 1)
    return y


@triton.jit
def _rows(L, K, y, valid, exp_domain):
    """T_r: the row scaling x that makes every row of the state sum to 1."""
    if exp_domain:
        x = _inv(tl.sum(K * y[:, None, :], axis=2), valid)
    else:
        x = _lse(L - y[:, None, :], valid, 2)
    return x


@triton.jit
def _state(L, K, x, y, exp_domain):
    """The matrices the scalings x, y give: u K c^T, or exp(L - a - b)."""
    if exp_domain:
        P = K * x[:, :, None] * y[:, None, :]
    else:
        P = tl.exp(L - x[:, :, None] - y[:, None, :])
    return P


@triton.jit
def _sinkhorn_fwd_kernel(L_ptr, H_ptr, N, n: tl.constexpr, N_PAD: tl.constexpr, ITERS: tl.constexpr,
                         BLOCK: tl.constexpr):
    L, K, offs, mask, valid, exp_domain = _load_logits(L_ptr, tl.program_id(0), N, n, N_PAD, BLOCK)
    tl.store(H_ptr + offs, _sinkhorn(L, K, valid, exp_domain, ITERS), mask=mask)


@triton.jit
def _sinkhorn(L, K, valid, exp_domain, ITERS: tl.constexpr):
    """The projection of a tile of logits: ITERS column then row normalizations (Eq. 9)."""
    x = _start(valid, exp_domain)
    y = x
    for _ in range(ITERS):
        y = _columns(L, K, x, valid, exp_domain)
        x = _rows(L, K, y, valid, exp_domain)
    return _state(L, K, x, y, exp_domain)


@triton.jit
def _sinkhorn_bwd_kernel(L_ptr, G_ptr, dL_ptr, S_ptr, N, n: tl.constexpr, N_PAD: tl.constexpr,
                         ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """dLoss/dL given G = dLoss/dH; S_ptr: scratch [ITERS, programs * BLOCK, N_PAD] for the row
    scalings x entering every step (each program its own BLOCK rows)."""
    pid = tl.program_id(0)
    L, K, offs, mask, valid, exp_domain = _load_logits(L_ptr, pid, N, n, N_PAD, BLOCK)
    G = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dL_ptr + offs, _sinkhorn_vjp(L, K, G, valid, exp_domain, S_ptr, pid, N_PAD, ITERS, BLOCK), mask=mask)


@triton.jit
def _sinkhorn_vjp(L, K, G, valid, exp_domain, S_ptr, pid, N_PAD: tl.constexpr, ITERS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The gradient with respect to the logits L of the Sinkhorn's output, given G, its gradient."""
    # one step's x for every matrix; int64, since ITERS of them can pass 2^31 values
    slots = tl.num_programs(0).to(tl.int64) * BLOCK * N_PAD
    hist = (pid * BLOCK + tl.arange(0, BLOCK))[:, None] * N_PAD + tl.arange(0, N_PAD)[None, :]
    # forward again, keeping the x that enters each step t (slot t); step t's y is T_c of it, so
    # the backward recomputes y instead of storing it (half the scratch traffic)
    x = _start(valid, exp_domain)
    y = x
    for t in range(ITERS):
        tl.store(S_ptr + t * slots + hist, x)
        y = _columns(L, K, x, valid, exp_domain)
        x = _rows(L, K, y, valid, exp_domain)
    # the output is exp(log H): the gradient with respect to log H is G * H
    G = G * _state(L, K, x, y, exp_domain)
    # walk back from the last step; x holds x_t, the row scaling step t made
    x_prev = tl.load(S_ptr + (ITERS - 1) * slots + hist)
    for k in range(ITERS):
        t = ITERS - 1 - k
        x_ahead = tl.load(S_ptr + tl.maximum(t - 1, 0) * slots + hist)  # the next step's, loaded early
        y = _columns(L, K, x_prev, valid, exp_domain)  # y_t, as the forward made it
        if exp_domain:  # both steps' matrices are u K c^T with the same c: share K c^T
            Kc = K * y[:, None, :]
            G = G - Kc * (x * tl.sum(G, axis=2))[:, :, None]                          # row step t
            G = G - Kc * x_prev[:, :, None] * tl.sum(G, axis=1)[:, None, :]           # column step t
        else:
            G = G - _state(L, K, x, y, exp_domain) * tl.sum(G, axis=2)[:, :, None]       # row step t
            G = G - _state(L, K, x_prev, y, exp_domain) * tl.sum(G, axis=1)[:, None, :]  # column step t
        x, x_prev = x_prev, x_ahead
    return G


def _sinkhorn_launch_args(N, n, backward=False):
    """N_PAD (n padded to a power of 2), matrices per program, warps, grid. Small programs win: on an
    H200 (393,216 4x4, log domain) the forward was fastest with 64 matrices on 2 warps, the backward
    with 32 matrices on 1 warp (4-6x faster than the same matrices on 2 or 4 warps; BENCHMARKS.md)."""
    N_PAD = triton.next_power_of_2(n)
    BLOCK = max(1, (512 if backward else 1024) // (N_PAD * N_PAD))
    return N_PAD, BLOCK, 1 if backward else 2, (triton.cdiv(N, BLOCK),)


@torch.library.custom_op("mhc::sinkhorn_fwd", mutates_args=())
def sinkhorn_fwd(logits: torch.Tensor, iters: int) -> torch.Tensor:
    n = logits.shape[-1]
    L = logits.reshape(-1, n, n).contiguous()
    H = torch.empty(L.shape, dtype=torch.float32, device=L.device)
    N_PAD, BLOCK, warps, grid = _sinkhorn_launch_args(L.shape[0], n)
    if L.shape[0] > 0:
        _sinkhorn_fwd_kernel[grid](L, H, L.shape[0], n=n, N_PAD=N_PAD, ITERS=iters, BLOCK=BLOCK, num_warps=warps)
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
    N_PAD, BLOCK, warps, grid = _sinkhorn_launch_args(L.shape[0], n, backward=True)
    scratch = torch.empty(iters, grid[0] * BLOCK, N_PAD, dtype=torch.float32, device=L.device)
    if L.shape[0] > 0:
        _sinkhorn_bwd_kernel[grid](L, G, dL, scratch, L.shape[0], n=n, N_PAD=N_PAD, ITERS=iters, BLOCK=BLOCK,
                                   num_warps=warps)
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
# mHC's maps from the projection h = [h_pre | h_post | h_res] (Eqs. 3-4, mhc.coefficients): the
# gates and the Sinkhorn (Eq. 9) in one kernel, forward and backward. What it buys is compile
# time: the gates' dozen small ops and their backward are two opaque ops in the graph Inductor
# compiles, once per connection, instead of some 40.

@triton.jit
def _gate(h_ptr, b_ptr, m, N, W: tl.constexpr, start: tl.constexpr, n: tl.constexpr, N_PAD: tl.constexpr):
    """h[m, start + k] and b[start + k] for k < n, [BLOCK, N_PAD] and [N_PAD] (padding = 0), offsets, mask."""
    k = tl.arange(0, N_PAD)
    mask = (m[:, None] < N) & (k[None, :] < n)
    h = tl.load(h_ptr + m[:, None] * W + start + k[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + start + k, mask=k < n, other=0.0).to(tl.float32)
    return h, b, m[:, None] * n + k[None, :], mask


@triton.jit
def _res_logits(h_ptr, b_ptr, a_res, m, mask, W: tl.constexpr, n: tl.constexpr, N_PAD: tl.constexpr):
    """h_res [BLOCK, N_PAD, N_PAD] (padding = 0) and the logits a_res * h_res + b_res (padding = -inf)."""
    i = tl.arange(0, N_PAD)
    within = i[None, :, None] * n + i[None, None, :]
    h = tl.load(h_ptr + m[:, None, None] * W + 2 * n + within, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + 2 * n + within, mask=(i[None, :, None] < n) & (i[None, None, :] < n), other=0.0)
    return h, tl.where(mask, a_res * h + b.to(tl.float32), float("-inf"))


@triton.jit
def _coefs_fwd_kernel(h_ptr, a_ptr, b_ptr, pre_ptr, post_ptr, res_ptr, N, n: tl.constexpr, N_PAD: tl.constexpr,
                      ITERS: tl.constexpr, BLOCK: tl.constexpr):
    W: tl.constexpr = 2 * n + n * n
    m, offs, mask = _matrices(tl.program_id(0), N, n, N_PAD, BLOCK)
    h, b, o, gmask = _gate(h_ptr, b_ptr, m, N, W, 0, n, N_PAD)
    tl.store(pre_ptr + o, tl.sigmoid(tl.load(a_ptr) * h + b[None, :]), mask=gmask)             # Eq. (3)
    h, b, o, gmask = _gate(h_ptr, b_ptr, m, N, W, n, n, N_PAD)
    tl.store(post_ptr + o, 2 * tl.sigmoid(tl.load(a_ptr + 1) * h + b[None, :]), mask=gmask)    # Eq. (4)
    h, L = _res_logits(h_ptr, b_ptr, tl.load(a_ptr + 2), m, mask, W, n, N_PAD)
    K, valid, exp_domain = _prepare(L, m, mask, N, n, N_PAD)
    tl.store(res_ptr + offs, _sinkhorn(L, K, valid, exp_domain, ITERS), mask=mask)             # Eq. (9)


@triton.jit
def _gate_bwd(h_ptr, b_ptr, a, g_ptr, dh_ptr, m, N, W: tl.constexpr, start: tl.constexpr, scale: tl.constexpr,
              n: tl.constexpr, N_PAD: tl.constexpr):
    """Backward of scale * sigmoid(a * h + b): writes dh, returns this block's sums for da and db."""
    h, b, o, mask = _gate(h_ptr, b_ptr, m, N, W, start, n, N_PAD)
    s = tl.sigmoid(a * h + b[None, :])
    dz = tl.load(g_ptr + o, mask=mask, other=0.0).to(tl.float32) * (scale * s * (1 - s))
    dz = tl.where(mask, dz, 0.0)
    tl.store(dh_ptr + m[:, None] * W + start + tl.arange(0, N_PAD)[None, :], a * dz, mask=mask)
    return tl.sum(tl.sum(dz * h, axis=1), axis=0), tl.sum(dz, axis=0)


@triton.jit
def _coefs_bwd_kernel(h_ptr, a_ptr, b_ptr, gpre_ptr, gpost_ptr, gres_ptr, dh_ptr, part_ptr, S_ptr, N,
                      n: tl.constexpr, N_PAD: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """dh, and per program the sums of da and db over its BLOCK tokens: part[pid] = [da (3) | db (W)]."""
    W: tl.constexpr = 2 * n + n * n
    pid = tl.program_id(0)
    m, offs, mask = _matrices(pid, N, n, N_PAD, BLOCK)
    k = tl.arange(0, N_PAD)
    row = part_ptr + pid * (3 + W)
    a_res = tl.load(a_ptr + 2)
    h, L = _res_logits(h_ptr, b_ptr, a_res, m, mask, W, n, N_PAD)
    K, valid, exp_domain = _prepare(L, m, mask, N, n, N_PAD)
    G = tl.load(gres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dL = tl.where(mask, _sinkhorn_vjp(L, K, G, valid, exp_domain, S_ptr, pid, N_PAD, ITERS, BLOCK), 0.0)
    within = k[:, None] * n + k[None, :]
    tl.store(dh_ptr + m[:, None, None] * W + 2 * n + within[None, :, :], a_res * dL, mask=mask)
    tl.store(row + 2, tl.sum(tl.sum(tl.sum(dL * h, axis=2), axis=1), axis=0))
    tl.store(row + 3 + 2 * n + within, tl.sum(dL, axis=0), mask=(k[:, None] < n) & (k[None, :] < n))
    da, db = _gate_bwd(h_ptr, b_ptr, tl.load(a_ptr), gpre_ptr, dh_ptr, m, N, W, 0, 1.0, n, N_PAD)
    tl.store(row, da)
    tl.store(row + 3 + k, db, mask=k < n)
    da, db = _gate_bwd(h_ptr, b_ptr, tl.load(a_ptr + 1), gpost_ptr, dh_ptr, m, N, W, n, 2.0, n, N_PAD)
    tl.store(row + 1, da)
    tl.store(row + 3 + n + k, db, mask=k < n)


@torch.library.custom_op("mhc::coefficients", mutates_args=())
def coefficients_fwd(h: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, n: int,
                     iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hf = h.reshape(-1, h.shape[-1]).contiguous()
    N = hf.shape[0]
    pre, post = (torch.empty(N, n, dtype=torch.float32, device=h.device) for _ in range(2))
    res = torch.empty(N, n, n, dtype=torch.float32, device=h.device)
    N_PAD, BLOCK, warps, grid = _sinkhorn_launch_args(N, n)
    if N > 0:
        _coefs_fwd_kernel[grid](hf, alpha.contiguous(), b.contiguous(), pre, post, res, N, n=n, N_PAD=N_PAD,
                                ITERS=iters, BLOCK=BLOCK, num_warps=warps)
    lead = h.shape[:-1]
    return pre.view(*lead, n), post.view(*lead, n), res.view(*lead, n, n)


@coefficients_fwd.register_fake
def _(h, alpha, b, n, iters):
    lead = h.shape[:-1]
    return (h.new_empty(*lead, n, dtype=torch.float32), h.new_empty(*lead, n, dtype=torch.float32),
            h.new_empty(*lead, n, n, dtype=torch.float32))


@torch.library.custom_op("mhc::coefficients_bwd", mutates_args=())
def coefficients_bwd(g_pre: torch.Tensor, g_post: torch.Tensor, g_res: torch.Tensor, h: torch.Tensor,
                     alpha: torch.Tensor, b: torch.Tensor, n: int,
                     iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    W = h.shape[-1]
    hf = h.reshape(-1, W).contiguous()
    N = hf.shape[0]
    dh = torch.empty(N, W, dtype=torch.float32, device=h.device)
    N_PAD, BLOCK, warps, grid = _sinkhorn_launch_args(N, n, backward=True)
    part = torch.empty(grid[0], 3 + W, dtype=torch.float32, device=h.device)  # every program writes its row
    scratch = torch.empty(iters, grid[0] * BLOCK, N_PAD, dtype=torch.float32, device=h.device)
    if N > 0:
        _coefs_bwd_kernel[grid](hf, alpha.contiguous(), b.contiguous(), g_pre.contiguous(), g_post.contiguous(),
                                g_res.contiguous(), dh, part, scratch, N, n=n, N_PAD=N_PAD, ITERS=iters,
                                BLOCK=BLOCK, num_warps=warps)
    d = part.sum(0)  # two outputs must not be views of one tensor
    return dh.view(h.shape).to(h.dtype), d[:3].to(alpha.dtype, copy=True), d[3:].to(b.dtype, copy=True)


@coefficients_bwd.register_fake
def _(g_pre, g_post, g_res, h, alpha, b, n, iters):
    return torch.empty_like(h), torch.empty_like(alpha), torch.empty_like(b)


def _coefficients_setup(ctx, inputs, output):
    h, alpha, b, n, iters = inputs
    ctx.save_for_backward(h, alpha, b)
    ctx.n, ctx.iters = n, iters


def _coefficients_backward(ctx, g_pre, g_post, g_res):
    return (*coefficients_bwd(g_pre, g_post, g_res, *ctx.saved_tensors, ctx.n, ctx.iters), None, None)


torch.library.register_autograd("mhc::coefficients", _coefficients_backward, setup_context=_coefficients_setup)


def coefficients(h, alpha, b, n, iters=20):
    """Same signature and meaning as mhc.coefficients: H_pre, H_post, H_res from h [..., 2n + n^2]."""
    if iters < 1:
        raise ValueError(f"coefficients: iters must be >= 1, got {iters}")
    return coefficients_fwd(h.float(), alpha.float(), b.float(), int(n), int(iters))


# ----------------------------------------------------------------------------------------------
# HC's maps from its per-stream projection p [M, n, n + 2] (mhc.hc_gates): b + s * tanh(p), p's
# columns (pre, post, then H_res's rows) become b's sections. As with mHC's coefficients, one op
# for the gates and their backward's sums over tokens buys compile time.

@triton.jit
def _hc_tile(pid, M, n: tl.constexpr, N_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """A [BLOCK, K_PAD, N_PAD] tile of BLOCK tokens: column k of stream j's row of p, and entry k * n
    + j of H (b's layout); the offsets of both, the mask, k and j."""
    m = (pid * BLOCK + tl.arange(0, BLOCK))[:, None, None]
    k = tl.arange(0, K_PAD)[None, :, None]
    j = tl.arange(0, N_PAD)[None, None, :]
    mask = (m < M) & (k < n + 2) & (j < n)
    return m * (n * (n + 2)) + j * (n + 2) + k, m * (n * (n + 2)) + k * n + j, mask, k, j


@triton.jit
def _tanh(x):
    e = tl.exp(-2 * tl.abs(x))  # never overflows
    return tl.where(x < 0, -1.0, 1.0) * (1 - e) / (1 + e)


@triton.jit
def _hc_fwd_kernel(p_ptr, s_ptr, b_ptr, H_ptr, M, n: tl.constexpr, N_PAD: tl.constexpr, K_PAD: tl.constexpr,
                   BLOCK: tl.constexpr):
    p_offs, H_offs, mask, k, j = _hc_tile(tl.program_id(0), M, n, N_PAD, K_PAD, BLOCK)
    t = _tanh(tl.load(p_ptr + p_offs, mask=mask, other=0.0))
    s = tl.load(s_ptr + tl.minimum(k, 2))  # s_pre, s_post, then s_res for every row of H_res
    b = tl.load(b_ptr + k * n + j, mask=(k < n + 2) & (j < n), other=0.0)
    tl.store(H_ptr + H_offs, b + s * t, mask=mask)


@triton.jit
def _hc_bwd_kernel(p_ptr, s_ptr, g_ptr, dp_ptr, part_ptr, M, n: tl.constexpr, N_PAD: tl.constexpr,
                   K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """dp, and per program the sums of ds and db over its BLOCK tokens: part[pid] = [ds (3) | db]."""
    pid = tl.program_id(0)
    p_offs, H_offs, mask, k, j = _hc_tile(pid, M, n, N_PAD, K_PAD, BLOCK)
    t = _tanh(tl.load(p_ptr + p_offs, mask=mask, other=0.0))
    g = tl.load(g_ptr + H_offs, mask=mask, other=0.0)  # padding 0: it adds nothing to the sums
    tl.store(dp_ptr + p_offs, g * tl.load(s_ptr + tl.minimum(k, 2)) * (1 - t * t), mask=mask)
    row = part_ptr + pid * (3 + n * (n + 2))
    gt = tl.sum(tl.sum(g * t, axis=2), axis=0)  # [K_PAD]: sum of g * tanh(p) for each column of p
    c = tl.arange(0, K_PAD)
    tl.store(row + c, gt, mask=c < 2)                                        # ds_pre, ds_post
    tl.store(row + 2, tl.sum(tl.where(c >= 2, gt, 0.0), axis=0))            # ds_res
    tl.store(row + 3 + k * n + j, tl.sum(g, axis=0)[None, :, :], mask=(k < n + 2) & (j < n))  # db


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # the stream ops' backward kernels need their inputs; HC's gates' need p and s


def _hc_launch_args(M, n):
    """Tokens a program (a tile of about 4,096 values), the pads and the grid."""
    N_PAD, K_PAD = triton.next_power_of_2(n), triton.next_power_of_2(n + 2)
    BLOCK = max(1, 4096 // (N_PAD * K_PAD))
    return N_PAD, K_PAD, BLOCK, (triton.cdiv(M, BLOCK),)


@torch.library.custom_op("mhc::hc_gates", mutates_args=())
def hc_gates_fwd(p: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = p.shape[-2]
    pf = p.reshape(-1, n, n + 2).contiguous()
    M = pf.shape[0]
    H = torch.empty(M, n * (n + 2), dtype=torch.float32, device=p.device)
    N_PAD, K_PAD, BLOCK, grid = _hc_launch_args(M, n)
    if M > 0:
        _hc_fwd_kernel[grid](pf, s.contiguous(), b.contiguous(), H, M, n=n, N_PAD=N_PAD, K_PAD=K_PAD, BLOCK=BLOCK)
    return H.view(*p.shape[:-2], n * (n + 2))


@hc_gates_fwd.register_fake
def _(p, s, b):
    return p.new_empty(*p.shape[:-2], p.shape[-2] * p.shape[-1], dtype=torch.float32)


@torch.library.custom_op("mhc::hc_gates_bwd", mutates_args=())
def hc_gates_bwd(g: torch.Tensor, p: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = p.shape[-2]
    pf = p.reshape(-1, n, n + 2).contiguous()
    M = pf.shape[0]
    dp = torch.empty_like(pf)
    N_PAD, K_PAD, BLOCK, grid = _hc_launch_args(M, n)
    part = torch.empty(grid[0], 3 + n * (n + 2), dtype=torch.float32, device=p.device)  # every program writes its row
    if M > 0:
        _hc_bwd_kernel[grid](pf, s.contiguous(), g.reshape(M, -1).float().contiguous(), dp, part, M, n=n,
                             N_PAD=N_PAD, K_PAD=K_PAD, BLOCK=BLOCK)
    d = part.sum(0)
    return dp.view(p.shape), d[:3].clone(), d[3:].clone()  # two outputs must not be views of one tensor


@hc_gates_bwd.register_fake
def _(g, p, s):
    return torch.empty_like(p), torch.empty_like(s), p.new_empty(p.shape[-2] * p.shape[-1])


def _hc_gates_backward(ctx, g):
    p, s, _ = ctx.saved_tensors
    return hc_gates_bwd(g, p, s)


torch.library.register_autograd("mhc::hc_gates", _hc_gates_backward, setup_context=_save_inputs)


def hc_gates(p, s, b):
    """Same signature and meaning as mhc.hc_gates: [..., 2n + n^2] in b's layout from p [..., n, n + 2]."""
    return hc_gates_fwd(p.float(), s.float(), b.float())


# ----------------------------------------------------------------------------------------------
# Stream mixing: the read (pre) and the write (post) of Eq. 1, over x [M, n, C] (M tokens).
# Each program takes BM tokens; x is read once per C-chunk as a [BM, N_PAD, BC] tile and the small
# n-axis sums stay in registers. The backward passes loop over C inside the program, so the
# coefficient gradients (sums over C) are reduced on chip and written once, without atomics.

@triton.jit
def _tile(ptr, m, c, M, C, n: tl.constexpr, N_PAD: tl.constexpr):
    """Load the [BM, N_PAD, BC] tile x[m, :, c] of a [M, n, C] tensor, as fp32 (padding = 0)."""
    i = tl.arange(0, N_PAD)
    offs = m[:, None, None] * (n * C) + i[None, :, None] * C + c[None, None, :]
    mask = (m[:, None, None] < M) & (i[None, :, None] < n) & (c[None, None, :] < C)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@triton.jit
def _load_coefs(ptr, m, M, n: tl.constexpr, N_PAD: tl.constexpr, stride: tl.constexpr, step: tl.constexpr, start):
    """Load [BM, N_PAD] coefficients ptr[m * stride + start + k * step] for k < n (padding = 0)."""
    k = tl.arange(0, N_PAD)
    mask = (m[:, None] < M) & (k[None, :] < n)
    return tl.load(ptr + m[:, None] * stride + start + k[None, :] * step, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pre_fwd_kernel(x_ptr, h_ptr, out_ptr, M, C, n: tl.constexpr, N_PAD: tl.constexpr,
                    BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    x, _, _ = _tile(x_ptr, m, c, M, C, n, N_PAD)
    h = _load_coefs(h_ptr, m, M, n, N_PAD, n, 1, 0)                                  # H_pre [BM, N_PAD]
    out = tl.sum(h[:, :, None] * x, axis=1)                                 # H_pre . x
    tl.store(out_ptr + m[:, None] * C + c[None, :], out, mask=(m[:, None] < M) & (c[None, :] < C))


@triton.jit
def _pre_bwd_kernel(x_ptr, h_ptr, g_ptr, dx_ptr, dh_ptr, M, C, n: tl.constexpr, N_PAD: tl.constexpr,
                    BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    h = _load_coefs(h_ptr, m, M, n, N_PAD, n, 1, 0)
    dh = tl.zeros((BM, N_PAD), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        x, offs, mask = _tile(x_ptr, m, c, M, C, n, N_PAD)
        mc = (m[:, None] < M) & (c[None, :] < C)
        g = tl.load(g_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, h[:, :, None] * g[:, None, :], mask=mask)   # dx = H_pre^T g
        dh += tl.sum(x * g[:, None, :], axis=2)                             # dH_pre = x . g
    k = tl.arange(0, N_PAD)
    tl.store(dh_ptr + m[:, None] * n + k[None, :], dh, mask=(m[:, None] < M) & (k[None, :] < n))


@triton.jit
def _post_fwd_kernel(x_ptr, y_ptr, hres_ptr, hpost_ptr, out_ptr, M, C, n: tl.constexpr, N_PAD: tl.constexpr,
                     BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    x, _, _ = _tile(x_ptr, m, c, M, C, n, N_PAD)
    mc = (m[:, None] < M) & (c[None, :] < C)
    y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
    for i in tl.static_range(n):
        h_row = _load_coefs(hres_ptr, m, M, n, N_PAD, n * n, 1, i * n)               # H_res[i, :]
        h_post = tl.load(hpost_ptr + m * n + i, mask=m < M, other=0.0)
        out_i = tl.sum(h_row[:, :, None] * x, axis=1) + h_post[:, None] * y   # stream i of Eq. 1
        tl.store(out_ptr + m[:, None] * (n * C) + i * C + c[None, :], out_i, mask=mc)


@triton.jit
def _post_bwd_kernel(x_ptr, y_ptr, hres_ptr, hpost_ptr, g_ptr, dx_ptr, dy_ptr, dhres_ptr, dhpost_ptr, M, C,
                     n: tl.constexpr, N_PAD: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets can pass 2^31
    kk = tl.arange(0, N_PAD * N_PAD)
    dh_res = tl.zeros((BM, N_PAD * N_PAD), dtype=tl.float32)   # [token, i * N_PAD + j]
    dh_post = tl.zeros((BM, N_PAD), dtype=tl.float32)
    k = tl.arange(0, N_PAD)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mc = (m[:, None] < M) & (c[None, :] < C)
        row = m[:, None] * (n * C) + c[None, :]  # stream 0 of x, g, dx at these tokens and channels
        y = tl.load(y_ptr + m[:, None] * C + c[None, :], mask=mc, other=0.0).to(tl.float32)
        dy = tl.zeros((BM, BC), dtype=tl.float32)
        for j in tl.static_range(n):
            x_j = tl.load(x_ptr + row + j * C, mask=mc, other=0.0).to(tl.float32)
            dx_j = tl.zeros((BM, BC), dtype=tl.float32)
            for i in tl.static_range(n):
                g_i = tl.load(g_ptr + row + i * C, mask=mc, other=0.0).to(tl.float32)  # dL/dx_next[i]
                h = tl.load(hres_ptr + m * (n * n) + i * n + j, mask=m < M, other=0.0)  # H_res[i, j]
                dx_j += h[:, None] * g_i                                          # dx_j = sum_i H_res[i, j] g_i
                d = tl.sum(g_i * x_j, axis=1)                                     # dH_res[i, j] = g_i . x_j
                dh_res += tl.where(kk[None, :] == i * N_PAD + j, d[:, None], 0.0)
                if j == 0:
                    h_post = tl.load(hpost_ptr + m * n + i, mask=m < M, other=0.0)
                    dy += h_post[:, None] * g_i                                   # dy = sum_i H_post[i] g_i
                    dh_post += tl.where(k[None, :] == i, tl.sum(g_i * y, axis=1)[:, None], 0.0)  # g_i . y
            tl.store(dx_ptr + row + j * C, dx_j, mask=mc)
        tl.store(dy_ptr + m[:, None] * C + c[None, :], dy, mask=mc)
    mk = (m[:, None] < M) & (k[None, :] < n)
    tl.store(dhpost_ptr + m[:, None] * n + k[None, :], dh_post, mask=mk)
    i_, j_ = kk // N_PAD, kk % N_PAD
    tl.store(dhres_ptr + m[:, None] * (n * n) + (i_ * n + j_)[None, :], dh_res,
             mask=(m[:, None] < M) & (i_[None, :] < n) & (j_[None, :] < n))


# The fastest tiles of sweeps on an H200 (C = 768, 16k tokens; BENCHMARKS.md has them, and
# `python bench.py --only=tiles` redoes them on any GPU): BM tokens and BC channels a program, and
# warps, by the stream's value bytes (fp32 4, bf16 2) and by N_PAD (4 for n <= 4, 8 above). A program
# that holds at least a token a warp keeps each token's sums over the streams inside one warp; with
# fewer, every sum crosses warps through shared memory (n = 8's post backward with 2 tokens on 4
# warps: 3.2 ms a call, against 0.47 ms with 4). The fp32 tiles at N_PAD = 8 were not swept: they
# hold the values of N_PAD = 4's tile, or one token where that is more.
_TILES = {
    "pre_fwd": {(4, 4): (4, 256, 8), (4, 8): (2, 256, 8), (2, 4): (4, 128, 2), (2, 8): (1, 512, 1)},
    "pre_bwd": {(4, 4): (1, 256, 8), (4, 8): (1, 256, 8), (2, 4): (1, 512, 1), (2, 8): (1, 512, 1)},
    "post_fwd": {(4, 4): (2, 256, 4), (4, 8): (1, 256, 4), (2, 4): (4, 256, 4), (2, 8): (1, 128, 1)},
    "post_bwd": {(4, 4): (4, 128, 4), (4, 8): (4, 128, 4), (2, 4): (4, 128, 4), (2, 8): (4, 128, 4)},
}


def _tile_key(n, value_bytes):
    """The _TILES entry for n streams of value_bytes each (fp64, a test's oracle input, as fp32)."""
    return min(value_bytes, 4), 4 if n <= 4 else 8


def _stream_tiles(kernel, n, C, value_bytes):
    """N_PAD, BM tokens and BC channels a program, and warps."""
    BM, BC, warps = _TILES[kernel][_tile_key(n, value_bytes)]
    return triton.next_power_of_2(n), BM, min(triton.next_power_of_2(C), BC), warps


def _compute_dtype(x):
    """The sublayer's input is at least fp32, also when the stream is stored in bf16."""
    return torch.promote_types(x.dtype, torch.float32)


def _flat(x, n):
    """[..., n, C] -> contiguous [M, n, C]."""
    return x.reshape(-1, n, x.shape[-1]).contiguous()


@torch.library.custom_op("mhc::stream_pre", mutates_args=())
def stream_pre(x: torch.Tensor, H_pre: torch.Tensor) -> torch.Tensor:
    """layer_in = H_pre . x: x [..., n, C], H_pre [..., n] -> [..., C] (dtype of x)."""
    n, C = x.shape[-2:]
    xf, hf = _flat(x, n), H_pre.reshape(-1, n).float().contiguous()
    out = torch.empty(xf.shape[0], C, dtype=_compute_dtype(x), device=x.device)
    N_PAD, BM, BC, warps = _stream_tiles("pre_fwd", n, C, xf.element_size())
    if xf.shape[0] > 0:
        _pre_fwd_kernel[(triton.cdiv(xf.shape[0], BM), triton.cdiv(C, BC))](xf, hf, out, xf.shape[0], C, n=n, N_PAD=N_PAD,
                                                                             BM=BM, BC=BC, num_warps=warps)
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
    N_PAD, BM, BC, warps = _stream_tiles("pre_bwd", n, C, xf.element_size())
    if xf.shape[0] > 0:
        _pre_bwd_kernel[(triton.cdiv(xf.shape[0], BM),)](xf, hf, gf, dx, dh, xf.shape[0], C, n=n, N_PAD=N_PAD,
                                                         BM=BM, BC=BC, num_warps=warps)
    return dx.view(x.shape), dh.view(H_pre.shape).to(H_pre.dtype)


@stream_pre_bwd.register_fake
def _(g, x, H_pre):
    return torch.empty_like(x), torch.empty_like(H_pre)


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
    N_PAD, BM, BC, warps = _stream_tiles("post_fwd", n, C, xf.element_size())
    if xf.shape[0] > 0:
        _post_fwd_kernel[(triton.cdiv(xf.shape[0], BM), triton.cdiv(C, BC))](xf, yf, rf, pf, out, xf.shape[0], C,
                                                                               n=n, N_PAD=N_PAD, BM=BM, BC=BC,
                                                                               num_warps=warps)
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
    N_PAD, BM, BC, warps = _stream_tiles("post_bwd", n, C, xf.element_size())
    if xf.shape[0] > 0:
        _post_bwd_kernel[(triton.cdiv(xf.shape[0], BM),)](xf, yf, rf, pf, gf, dx, dy, dres, dpost, xf.shape[0], C,
                                                          n=n, N_PAD=N_PAD, BM=BM, BC=BC, num_warps=warps)
    return (dx.view(x.shape), dy.view(y.shape), dres.view(H_res.shape).to(H_res.dtype),
            dpost.view(H_post.shape).to(H_post.dtype))


@stream_post_bwd.register_fake
def _(g, x, y, H_res, H_post):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(H_res), torch.empty_like(H_post)


def _post_backward(ctx, g):
    return stream_post_bwd(g, *ctx.saved_tensors)


torch.library.register_autograd("mhc::stream_post", _post_backward, setup_context=_save_inputs)
