"""
Hyper-Connections (HC) and Manifold-Constrained Hyper-Connections (mHC), in plain PyTorch.

A plain residual network carries one vector per token: x_{l+1} = x_l + F(x_l).
HC and mHC widen that vector into n parallel *streams* (an n x C matrix per token) and wrap
every sublayer F (attention or MLP, each with its own pre-norm) as

    x_{l+1} = H_res . x_l  +  H_post^T . F(H_pre . x_l)                             (1)

    H_pre  (1 x n)  reads the sublayer's input out of the n streams,
    H_post (1 x n)  writes the sublayer's output back into each stream,
    H_res  (n x n)  mixes the streams with each other.

HC (Zhu et al. 2024) learns the three maps freely. mHC (DeepSeek 2025) constrains them:
H_pre >= 0, H_post in (0, 2), and H_res doubly stochastic (projected onto the Birkhoff polytope
by Sinkhorn-Knopp), so the product of H_res over any depth keeps a gain of about 1.

This file is the readable reference: every function is the exact math, autograd does the
backward. sinkhorn_kernel.py holds the fast Triton versions; the tests check them against this.
Stream tensors are laid out as [..., n, C] (e.g. [B, T, n, C]).
"""
import itertools
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the Triton kernels; without Triton (Windows, macOS) the PyTorch path below still trains
    import sinkhorn_kernel as triton_kernels
except ImportError:
    triton_kernels = None

RESIDUAL_MODES = ("residual", "hc", "mhc", "mhc_lite")
KERNELS = ("auto", "triton", "torch")


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp projection (the mHC paper's Eq. 9)

def sinkhorn(logits, iters=20):
    """Project logits [..., n, n] to a (nearly) doubly stochastic matrix.

    M_0 = exp(logits); each iteration divides every column by its sum (T_c), then every row by
    its sum (T_r): M_t = T_r(T_c(M_{t-1})). Ending on the rows makes every row sum to exactly 1,
    so with x_next = H_res . x each output stream is a convex combination of the input streams.
    The columns sum to 1 only approximately: closely for small logits (about 1e-3 off for random
    4x4 logits of scale 1), far less for large ones, which is the 20-step function, not a bug.

    We run the same iterations in the log domain (subtracting a logsumexp is dividing by a sum),
    which is the same function in exact arithmetic but cannot overflow (exp(100) is inf in fp32)
    or underflow a whole column to zeros (exp(-200) is 0). Autograd differentiates through the
    unrolled iterations, so the gradient is that of this 20-step function, not of the ideal
    projection. Half-precision inputs are computed in fp32; fp64 stays fp64 (the test oracle).
    """
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    log_m = logits.to(torch.promote_types(logits.dtype, torch.float32))
    for _ in range(iters):
        log_m = log_m - log_m.logsumexp(dim=-2, keepdim=True)  # T_c: columns sum to 1
        log_m = log_m - log_m.logsumexp(dim=-1, keepdim=True)  # T_r: rows sum to 1
    return log_m.exp()


# ----------------------------------------------------------------------------------------------
# The maps from their projection (the class docstrings below have the equations): mHC's gates,
# then its Sinkhorn; HC's gates. The Triton versions are one kernel each (forward and backward),
# a few ops for torch.compile to lower in place of some forty a connection.

def gates(h, alpha, b, n):
    """Eqs. (3)-(4) up to the projection of H_res: from h = [h_pre | h_post | h_res] [..., 2n + r]
    and the static parts b (same layout), H_pre, H_post and the logits of H_res [..., r]."""
    h_pre, h_post, h_res = h.split([n, n, h.shape[-1] - 2 * n], dim=-1)
    b_pre, b_post, b_res = b.split([n, n, b.shape[-1] - 2 * n])
    H_pre = torch.sigmoid(alpha[0] * h_pre + b_pre)
    H_post = 2 * torch.sigmoid(alpha[1] * h_post + b_post)
    return H_pre, H_post, alpha[2] * h_res + b_res


def coefficients(h, alpha, b, n, iters=20):
    """mHC's maps from h [..., 2n + n^2]: the gates, then the Sinkhorn of H_res's logits."""
    H_pre, H_post, res_logits = gates(h, alpha, b, n)
    return H_pre, H_post, sinkhorn(res_logits.unflatten(-1, (n, n)), iters)


def hc_gates(p, s, b):
    """HC's maps b + s * tanh(p), from the per-stream projection p [..., n, n + 2]. Row j of p is
    stream j's [pre, post, column j of H_res]; transposed and flattened, p's columns are b's layout
    [pre (n) | post (n) | H_res row by row (n*n)]. s = [s_pre, s_post, s_res]."""
    n = p.shape[-2]
    d = torch.tanh(p) * torch.cat([s[:2], s[2:].expand(n)])  # column k scaled by s_pre, s_post, s_res...
    return b + d.transpose(-1, -2).flatten(-2)


# ----------------------------------------------------------------------------------------------
# The connection around one sublayer: Eq. (1). HC and mHC differ only in how they make the maps.
# The stream products run outside autocast and in (at least) fp32: under bf16 autocast an einsum
# would round the stream itself at every sublayer. A bf16 stream (GPTConfig.stream_dtype) is
# only *stored* in bf16; the sums are still taken in fp32, as in the kernels.

def inv_rms(v):
    """1 / rms(v) over the last dim (eps 1e-6 inside the root), summed in fp32 (fp64 for the tests'
    oracle) whatever v's dtype. The maps take rmsnorm(v) . W as (v . W) * inv_rms(v): the same
    number, and a bf16 stream meets W in bf16 instead of through a normalized fp32 copy. The sum
    of squares is a norm with an fp32 accumulator, not v.float().pow(2): its backward needs v
    itself, so a compiled model keeps the bf16 stream for it and not an fp32 copy per sublayer."""
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=torch.promote_types(v.dtype, torch.float32))
    return torch.rsqrt(norm.square() / v.shape[-1] + 1e-6)


def stream_pre(x, H_pre):
    """The sublayer's input H_pre . x: x [..., n, C], H_pre [..., n] -> [..., C]."""
    dt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum("...i,...ic->...c", H_pre.to(dt), x.to(dt))  # fp32 even for a bf16 stream


def stream_post(x, y, H_res, H_post):
    """The next stream H_res . x + H_post^T y: x [..., n, C], y [..., C] -> [..., n, C]."""
    dt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        mixed = torch.einsum("...ij,...jc->...ic", H_res.to(dt), x.to(dt))
        return (mixed + H_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)).to(x.dtype)


class Connection(nn.Module):
    """Wraps any sublayer F: [..., C] -> [..., C] as x_next = H_res x + H_post^T F(H_pre x).

    Subclasses implement maps(x) -> (H_pre [..., n], H_post [..., n], H_res [..., n, n]).
    All static parts live in one flat parameter `b`, [pre (n) | post (n) | res (n*n; mHC-lite n!)],
    the same layout as the coefficients; being 1-D it gets no weight decay (model.py decays
    matrices only), as the HC paper asks for the static parts.
    """

    def __init__(self, n, C, kernel="torch", res_mixing=True):
        super().__init__()
        self.n, self.C, self.kernel, self.res_mixing = n, C, kernel, res_mixing

    def dynamic_weight(self, name, value, dynamic):
        """The weights of a map's token-dependent term: a parameter, or for the ablation
        dynamic=False a constant zero (a buffer), so that only the static part b is left."""
        if dynamic:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, torch.zeros_like(value))

    def res_or_identity(self, H_res):
        """H_res, or the identity for the ablation res_mixing=False (streams never mix)."""
        return H_res if self.res_mixing else torch.eye(self.n, dtype=H_res.dtype, device=H_res.device).expand_as(H_res)

    def forward(self, x, sublayer):
        f = ops(self.kernel, x)  # stream_pre / stream_post: this file's, or the Triton kernels
        H_pre, H_post, H_res = self.maps(x)
        y = sublayer(f.stream_pre(x, H_pre))
        return f.stream_post(x, y, H_res, H_post)


class HyperConnection(Connection):
    """Dynamic HC (Zhu et al. 2024): each map = static part + s * tanh(token-dependent part).

    As in HC, the dynamic part is computed per stream from that stream's own normalized C-vector:
    stream j gives one H_pre weight, one H_post weight and column j of H_res (where stream j goes).
    The dynamic weights W start at 0 and the scales s at 0.01; the static parts start as a plain
    pre-norm residual: H_pre one-hot on stream (k mod n) for sublayer k, H_post all ones,
    H_res = identity. With all streams equal copies of the embedding, the network at init is
    then exactly the residual GPT. HC has no constraint: its maps can grow without bound.
    """

    def __init__(self, n, C, layer_id, kernel="torch", dynamic=True, res_mixing=True):
        super().__init__(n, C, kernel, res_mixing)
        self.dynamic_weight("W", torch.zeros(C, n + 2), dynamic)   # per stream: [pre, post, res column]
        self.dynamic_weight("s", torch.full((3,), 0.01), dynamic)  # scales of pre, post, res
        b_pre = F.one_hot(torch.tensor(layer_id % n), n).float()
        self.b = nn.Parameter(torch.cat([b_pre, torch.ones(n), torch.eye(n).flatten()]))

    def maps(self, x):
        n = self.n
        with torch.autocast(x.device.type, enabled=False):  # coefficients in fp32 (see model.py)
            p = (x @ self.W.to(x.dtype)) * inv_rms(x)  # rmsnorm(x_j) . W: [..., n, n + 2]
            H = ops(self.kernel, x).hc_gates(p, self.s, self.b)  # b + s * tanh(p), in b's layout
            H_pre, H_post, H_res = H.split([n, n, n * n], dim=-1)
        return H_pre, H_post, self.res_or_identity(H_res.unflatten(-1, (n, n)))


class ManifoldHyperConnection(Connection):
    """mHC (DeepSeek 2025): the maps come from the whole flattened state and are constrained.

        v = vec(x)  (1 x nC);  h = rmsnorm(v) . phi   (phi: nC x (2n + n^2))                  (2)
        H~ = alpha * h + b   (one learnable gate alpha per map, init 0.01)                     (3)
        H_pre = sigmoid(H~_pre),  H_post = 2 sigmoid(H~_post),  H_res = Sinkhorn(H~_res)       (4)

    Choices the paper leaves open, and why:
    - rmsnorm has no gain of its own: phi absorbs it. We compute (v . phi) / rms(v) (eps 1e-6
      inside the root), the same number, so a kernel can read x once.
    - phi ~ N(0, 1/(nC)): each raw coefficient h has unit scale at init, so alpha alone says
      how token-dependent the maps start (1%). Non-zero so alpha gets a gradient from step one.
    - b_post = post_init * (+1 on stream k mod n, -1 elsewhere). post_init = 1 (the default, the
      mHC-lite authors' b_post) writes 1.46 to one stream and 0.54 to the others, so the streams
      differ from the first step (see the symmetry note below). At GPT-2 small's shape it ended
      0.09 to 0.11 below post_init = 0 (three seeds), and still 0.08 below with H_res fixed to I:
      the gain is in the write, not in the mixing. An equal write of the same average share
      (0.77 to every stream) gets only a quarter of it: what pays is that the streams differ
      (RESULTS.md). post_init = 0 is HC's all-ones write, H_post = 2 sigmoid(0) = 1 on every
      stream: each sublayer's output is added once to every stream, as in a residual network.
    - b_pre = +1 on stream (k mod n) for sublayer k, -1 elsewhere (H_pre = 0.73 / 0.27): as in
      HC, different sublayers lean on different streams, which breaks the symmetry between the
      otherwise identical streams. The sublayer's pre-norm removes the overall scale of H_pre x.
    - b_res = res_init * I (diagonal logit gap; Sinkhorn ignores constant shifts). At gap g each
      H_res starts with (e^g - 1) / (e^g + n - 1) of identity; the product over L sublayers keeps
      that to the power L. g = 6 keeps 0.79 of the identity over 24 sublayers (GPT-2 small) and
      0.53 over 64, where g = 4 keeps 0.01 over 64 (streams collapsed to one mix before training
      starts) and g = 8 starts with off-diagonals of 3e-4 (no mixing). Measured over 64 sublayers
      (RESULTS.md, "Depth"), with post_init = 0 only the g = 6 product moves (g = 4 stays at
      uniform, g = 8 at the identity: Adam steps a logit by about the learning rate, and the
      product's response scales with the off-diagonal mass e^-g); with post_init = 1 all three
      move. Losses tie either way, so g = 6, between the two ends, is the default.
    The symmetry: every stream starts as the same copy of the embedding. While the streams are
    equal, x_j = x for all j, the gradient of H_res[i, j] is g_i . x, the same along each row; a
    row-constant gradient is exactly what the Sinkhorn's last step (rows sum to 1) maps to zero,
    so H_res's logits get no gradient at all (tested). With post_init = 0 every sublayer writes
    the same to every stream, and only the 1% token-dependent terms and b_post's slow drift make
    the streams differ: H_res barely learns (RESULTS.md, "Why H_res barely moves").
    """

    def __init__(self, n, C, layer_id, sinkhorn_iters=20, res_init=6.0, post_init=1.0, kernel="torch",
                 dynamic=True, res_mixing=True, n_res=None):
        super().__init__(n, C, kernel, res_mixing)
        self.sinkhorn_iters, self.n_res = sinkhorn_iters, n_res or n * n
        self.dynamic_weight("phi", torch.randn(n * C, 2 * n + self.n_res) / math.sqrt(n * C), dynamic)
        self.dynamic_weight("alpha", torch.full((3,), 0.01), dynamic)  # gates of pre, post, res
        b_pre = 2 * F.one_hot(torch.tensor(layer_id % n), n).float() - 1
        self.b = nn.Parameter(torch.cat([b_pre, post_init * b_pre, self.res_bias(res_init)]))

    def res_bias(self, res_init):
        return (res_init * torch.eye(self.n)).flatten()

    def coefficients(self, h, x):
        """Eqs. (3)-(4): H_pre, H_post and H_res = Sinkhorn(H~_res) from the projection h."""
        return ops(self.kernel, x).coefficients(h, self.alpha, self.b, self.n, self.sinkhorn_iters)

    def maps(self, x):
        with torch.autocast(x.device.type, enabled=False):  # the coefficients in fp32
            v = x.flatten(-2)                                                        # [..., nC]
            # A bf16 stream meets phi in bf16 (fp32 sums, as autocast runs every Linear): an fp32
            # copy of the stream for the product would cost more bytes than the bf16 stream saves.
            h = (v @ self.phi.to(v.dtype)) * inv_rms(v)                              # (2)
            H_pre, H_post, H_res = self.coefficients(h, x)                           # (3), (4)
        return H_pre, H_post, self.res_or_identity(H_res)


class ManifoldHyperConnectionLite(ManifoldHyperConnection):
    """mHC-lite (Yang & Gao 2026): H_res = sum_r softmax(alpha h_res + b_res)_r P_r, a convex
    combination of the n! permutation matrices P_r. Exactly doubly stochastic by construction, with
    no iterations; everything else is mHC. phi gives 2n + n! coefficients (n = 4: 8 + 24).

    b_res starts on the identity permutation, with the logit that gives H_res the same diagonal
    as mHC's Sinkhorn(res_init * I), so the two start from the same mixing and differ only in how
    they can learn to move away from it."""

    def __init__(self, n, C, layer_id, res_init=6.0, post_init=1.0, kernel="torch", dynamic=True, res_mixing=True):
        check_mode("mhc_lite", n)
        super().__init__(n, C, layer_id, 0, res_init, post_init, kernel, dynamic, res_mixing, n_res=math.factorial(n))
        perms = list(itertools.permutations(range(n)))  # the identity first
        self.register_buffer("P", torch.eye(n)[torch.tensor(perms)], persistent=False)  # P_r[i, perm_r(i)] = 1

    def res_bias(self, res_init):
        N, n = math.factorial(self.n), self.n
        d = math.exp(res_init) / (math.exp(res_init) + n - 1)  # mHC's initial diagonal
        # (n-1)! permutations fix a given stream, the identity among them: with logit g on the
        # identity and 0 elsewhere the diagonal is (e^g + (n-1)! - 1) / (e^g + n! - 1) = d
        g = math.log((d * (N - 1) - (math.factorial(n - 1) - 1)) / (1 - d)) if n > 1 else 0.0
        return F.one_hot(torch.tensor(0), N).float() * g

    def coefficients(self, h, x):
        H_pre, H_post, res_logits = gates(h, self.alpha, self.b, self.n)
        return H_pre, H_post, torch.einsum("...r,rij->...ij", torch.softmax(res_logits, dim=-1), self.P)


def make_connection(residual, n, C, layer_id, sinkhorn_iters=20, res_init=6.0, post_init=1.0, kernel="torch",
                    dynamic=True, res_mixing=True):
    """The connection for sublayer `layer_id` (0, 1, 2, ... in depth order). dynamic=False and
    res_mixing=False are the paper's ablations: static maps only, and H_res fixed to I."""
    check_mode(residual, n)
    options = dict(kernel=kernel, dynamic=dynamic, res_mixing=res_mixing)
    if residual == "hc":
        return HyperConnection(n, C, layer_id, **options)
    if residual == "mhc":
        return ManifoldHyperConnection(n, C, layer_id, sinkhorn_iters, res_init, post_init, **options)
    if residual == "mhc_lite":
        return ManifoldHyperConnectionLite(n, C, layer_id, res_init, post_init, **options)
    raise ValueError("residual='residual' has no connection to build: it is the plain x + F(x)")


# ----------------------------------------------------------------------------------------------
# Streams in and out of the model

def expand_streams(x, n, dtype=None):
    """[..., C] -> [..., n, C]: every stream starts as a copy of the token+position embedding
    (stored in `dtype`, default x's)."""
    return x.to(dtype or x.dtype).unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


def reduce_streams(x):
    """[..., n, C] -> [..., C]. We average (HC sums): the final norm makes the two equivalent,
    and with the mean an untrained HC/mHC model (all streams equal) hands the final norm exactly
    the residual model's stream."""
    return x.mean(dim=-2, dtype=torch.promote_types(x.dtype, torch.float32))  # a bf16 stream sums in fp32


# ----------------------------------------------------------------------------------------------
# Diagnostics

def _product(mats):
    """P = H_res^(L) ... H_res^(1) in float64, for matrices given in depth order."""
    mats = [torch.as_tensor(m, dtype=torch.float64).cpu() for m in mats]
    if not mats:
        raise ValueError("need at least one H_res matrix")
    P = mats[0]
    for m in mats[1:]:
        P = m @ P
    return P


def gain_magnitude(mats):
    """Composite gain of the H_res matrices `mats` ([n, n] each, in depth order).

    Returns (forward_gain, backward_gain) of P = H_res^(L) ... H_res^(1): the largest absolute
    row sum of P (how much one output stream can amplify the input streams; the infinity norm)
    and the largest absolute column sum (the same for gradients flowing back; the 1-norm).
    Both are 1 for a product of doubly stochastic matrices. model.GPT.mixing_matrices gives
    the batch-mean H_res of each sublayer (averaged over every token of a batch), so the gain
    train.py logs is that of the product of batch means, not a per-token maximum.
    """
    P = _product(mats).abs()
    return P.sum(-1).max().item(), P.sum(-2).max().item()


def composite_distance(mats):
    """(to_identity, to_uniform): Frobenius distances of P = H_res^(L) ... H_res^(1) to the
    identity (streams kept apart) and to the uniform matrix J/n (every stream the same mix)."""
    P = _product(mats)
    n = P.shape[-1]
    to_identity = (P - torch.eye(n, dtype=P.dtype)).norm().item()
    to_uniform = (P - torch.full_like(P, 1.0 / n)).norm().item()
    return to_identity, to_uniform


# ----------------------------------------------------------------------------------------------
# Which code runs, and the settings a connection cannot run with

def check_mode(residual, n):
    """A ValueError for a residual mode this file does not know, or too many streams for mHC-lite."""
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual={residual!r} is not known; use one of {', '.join(RESIDUAL_MODES)}")
    if residual == "mhc_lite" and n > 5:
        raise ValueError(f"mhc_lite mixes all n! permutation matrices: n_streams={n} would give "
                         f"{math.factorial(n):,}; use n_streams <= 5")


def check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not known; use one of {', '.join(KERNELS)}")


def ops(kernel, x):
    """The one place that picks the code for the maps' gates (mHC's with its Sinkhorn, coefficients;
    HC's, hc_gates) and the stream read/write: this file's reference (kernel="torch"),
    sinkhorn_kernel.py's Triton kernels ("triton"), or "auto": Triton on CUDA tensors, the
    reference elsewhere. Everything else (the maps' projection and norm, mHC-lite's gates) is plain
    PyTorch on either path, which torch.compile fuses well."""
    if kernel == "torch" or (kernel == "auto" and not (x.is_cuda and triton_kernels is not None)):
        return sys.modules[__name__]
    check_kernel(kernel)
    if triton_kernels is None:
        raise RuntimeError("kernel='triton' but Triton is not installed: pip install triton, or use kernel='torch'")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel='triton' needs a CUDA GPU; use kernel='torch' on the CPU "
                           "(or set TRITON_INTERPRET=1 to run the kernels, slowly, in Triton's interpreter)")
    return triton_kernels
