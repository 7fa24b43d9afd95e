"""
A GPT language model in the spirit of nanoGPT, whose residual stream is one of:
  residual  x + F(x), the plain GPT-2 stream,
  hc        Hyper-Connections: n learnable, unconstrained streams,
  mhc       Manifold-Constrained Hyper-Connections: n streams mixed by doubly stochastic maps.
The connections live in mhc.py; this file knows nothing about Triton.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import mhc


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304   # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True         # biases in Linear and LayerNorm, as GPT-2
    residual: str = "residual"  # "residual" | "hc" | "mhc" | "mhc_lite"
    n_streams: int = 4        # n, the expansion rate (ignored by "residual", which is n = 1)
    sinkhorn_iters: int = 20  # t_max of the mHC Sinkhorn-Knopp projection
    res_init: float = 6.0     # mHC: diagonal logit gap of the H_res bias at init (see mhc.py)
    post_init: float = 1.0    # mHC: H_post bias at init, +post_init on one stream, -post_init on the rest
    kernel: str = "auto"      # "auto" (Triton on CUDA), "triton" or "torch" (mhc.py's reference)
    recompute: bool = False   # HC/mHC: recompute the streams and maps in the backward (less memory)
    stream_dtype: str = "float32"  # HC/mHC: how the n-stream state is stored: "float32" or "bfloat16"
    dynamic: bool = True      # ablation: False keeps only the static (bias) part of every map
    res_mixing: bool = True   # ablation: False fixes H_res = I (the streams never mix)

    def __post_init__(self):
        """Every setting checked once, here: a ValueError that names the setting and what it allows."""
        mhc.check_mode(self.residual, self.n_streams)
        mhc.check_kernel(self.kernel)
        if self.stream_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"stream_dtype={self.stream_dtype!r} is not known; use float32 or bfloat16")
        for name in ("n_streams", "sinkhorn_iters", "n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is not allowed; it must be in [0, 1)")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # [B, T, C] -> [B, n_head, T, head_size]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


# What recompute=True keeps: the outputs of the matmuls and of attention (costly to redo), and
# of dropout (its mask: a recomputation that skips the saved attention, which draws random
# numbers on a GPU, would draw different masks). Everything else inside a block (the
# connections' streams and maps, norms, GELU) is recomputed in the backward, so a block stores
# one n-stream state, its input, instead of one per sublayer.
_KEEP = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu", "native_dropout")
    if hasattr(torch.ops.aten, name)}


def _recompute_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_context():
    return create_selective_checkpoint_contexts(_recompute_policy)


class Block(nn.Module):
    """Two sublayers, attention and MLP, each with its pre-norm. With residual="residual" the
    stream is [B, T, C] and each sublayer is added to it; with "hc"/"mhc" the stream is
    [B, T, n, C] and each sublayer is wrapped by its own connection (mhc.py, Eq. 1)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.streams = config.residual != "residual"
        self.recompute = self.streams and config.recompute
        if self.streams:
            args = (config.residual, config.n_streams, config.n_embd)
            kw = dict(sinkhorn_iters=config.sinkhorn_iters, res_init=config.res_init, post_init=config.post_init,
                      kernel=config.kernel, dynamic=config.dynamic, res_mixing=config.res_mixing)
            self.conn_attn = mhc.make_connection(*args, layer_id=2 * layer_idx, **kw)
            self.conn_mlp = mhc.make_connection(*args, layer_id=2 * layer_idx + 1, **kw)

    def forward(self, x):
        if not self.streams:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.connected, x, use_reentrant=False, context_fn=_recompute_context)
        return self.connected(x)

    def connected(self, x):
        """Each sublayer (with its pre-norm) inside its connection, Eq. 1."""
        x = self.conn_attn(x, lambda h: self.attn(self.ln_1(h)))
        return self.conn_mlp(x, lambda h: self.mlp(self.ln_2(h)))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # only Linear and Embedding: the connections in mhc.py initialize their own parameters
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the position embeddings, as nanoGPT reports
        (the token embeddings are tied to the LM head, so they count)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def connections(self):
        """The HC/mHC connection modules in depth order (attn, mlp, attn, mlp, ...)."""
        return [m for m in self.modules() if isinstance(m, mhc.Connection)]

    def num_connection_params(self):
        return sum(p.numel() for c in self.connections() for p in c.parameters())

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        if self.config.residual != "residual":
            x = mhc.expand_streams(x, self.config.n_streams, getattr(torch, self.config.stream_dtype))  # [B, T, n, C]
        for block in self.transformer.h:
            x = block(x)
        if self.config.residual != "residual":
            x = mhc.reduce_streams(x)                            # [B, T, C]
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position is needed
            loss = None
        return logits, loss

    @torch.no_grad()
    def mixing_matrices(self, idx):
        """The H_res of every sublayer in depth order, each averaged over the batch and the
        sequence ([n, n], float32), for the tokens `idx` [B, T]. Empty for the residual model."""
        mats, hooks = [], []
        for conn in self.connections():
            # a pre-hook sees the connection's input stream x and recomputes its maps from it
            hooks.append(conn.register_forward_pre_hook(
                lambda m, args: mats.append(m.maps(args[0])[2].float().flatten(0, -3).mean(0))))
        try:
            if hooks:
                self(idx)
        finally:
            for h in hooks:
                h.remove()
        return mats

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay every matrix (Linear weights, embeddings, HC's W, mHC's phi); no decay for
        # biases, norms, gates and the static parts of the connections (all 1-D)
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM appendix,
        plus the HC/mHC connections: per sublayer and token, the coefficient projection
        (mHC: nC x (2n+n^2); mHC-lite: nC x (2n+n!); HC: n streams of C x (n+2)), H_pre.x (nC), H_res.x (n^2 C) and the
        H_post write (nC), each a multiply-add. The Sinkhorn's O(iters n^2) is left out (tiny)."""
        cfg = self.config
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        # the connections' parameters are counted by their own terms below (HC's W serves n streams)
        flops = 6 * (self.get_num_params() - self.num_connection_params()) + 12 * L * H * Q * T
        if cfg.residual != "residual":
            n, C = cfg.n_streams, cfg.n_embd
            proj = n * C * {"hc": n + 2, "mhc": 2 * n + n * n, "mhc_lite": 2 * n + math.factorial(n)}[cfg.residual]
            flops += 2 * L * 6 * (proj + n * C + n * n * C + n * C)
        return flops

    def estimate_mfu(self, fwdbwd_per_iter, dt, device=None):
        """Model FLOPs utilization of ONE device, against the dense bf16 peak of the GPU actually
        found (None when the GPU is unknown or there is none: no honest peak to divide by)."""
        peak = gpu_peak_flops(device)
        if peak is None or dt <= 0:
            return None
        return self.flops_per_token(self.config.block_size) * self.config.block_size * fwdbwd_per_iter / dt / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after idx [B, T], feeding each prediction back in."""
        return torch.cat([idx, *self.generate_tokens(idx, max_new_tokens, temperature, top_k)], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """The same, one new token [B, 1] at a time, as it is sampled (for printing as it goes).
        temperature=0 takes the most likely token every time."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next


# dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name()
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12,
                  "A100": 312e12, "A800": 312e12, "A10G": 70e12, "L4": 121e12, "L40S": 362e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "B200": 2250e12}


def gpu_peak_flops(device=None):
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    hits = [k for k in GPU_PEAK_FLOPS if k in name]
    return GPU_PEAK_FLOPS[max(hits, key=len)] if hits else None
