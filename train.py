"""
Train a GPT whose residual stream is a plain residual, HC or mHC (nanoGPT's loop).

One process (CPU or one GPU):
    python train.py config/quick_cpu.py --residual=mhc
    python train.py --residual=hc --batch_size=32 --compile=False
Many GPUs on one node, PyTorch DDP:
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_8gpu.py
Many nodes: run torchrun on each with --nnodes, --node_rank, --master_addr, --master_port.

Every default below can be overridden by a config file or --key=value (see configurator.py).
The defaults are GPT-2 124M on OpenWebText, as in nanoGPT.
"""
import importlib.util
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

import mhc
from configurator import at_least, die, not_a_folder, settings
from model import GPT, GPTConfig

DEFAULTS = dict(
    # I/O
    out_dir="out",              # ckpt.pt and log.jsonl go here
    data_dir="data/openwebtext",  # train.bin, val.bin (and meta.json) from prepare_data.py
    extra_val="",               # a second validation set: a data dir with val.bin, or a .bin file
    init_from="scratch",        # "scratch" or "resume" (from out_dir/ckpt.pt)
    eval_interval=2000,         # evaluate, log the gains and save a checkpoint every this many steps
    eval_iters=200,             # batches per loss estimate
    log_interval=10,            # print and log the training loss every this many steps
    eval_only=False,            # evaluate out_dir/ckpt.pt once and exit (writes nothing)
    wandb_log=False,            # also log to Weights & Biases (pip install wandb)
    wandb_project="mhc-gpt",    # its project
    wandb_run_name="",          # its run name ("": wandb picks one)
    # data: each step sees batch_size * gradient_accumulation_steps * block_size tokens, whatever
    # the number of processes (under DDP the micro-steps are shared out between the ranks)
    batch_size=12,              # sequences per micro-step (per process)
    block_size=1024,            # tokens per sequence (the context length)
    gradient_accumulation_steps=1,  # micro-steps per optimizer step (config/gpt2_124m_8gpu.py: 40)
    # model
    n_layer=12,                 # transformer blocks (each has 2 sublayers: attention, MLP)
    n_head=12,                  # attention heads
    n_embd=768,                 # C, the width
    dropout=0.0,                # dropout rate (0 for pretraining)
    bias=False,                 # biases in the Linear and LayerNorm layers
    residual="mhc",             # "residual" | "hc" | "mhc" | "mhc_lite"
    n_streams=4,                # n, the number of streams (hc, mhc)
    sinkhorn_iters=20,          # mHC's Sinkhorn-Knopp iterations
    res_init=6.0,               # mHC's H_res bias: diagonal logit gap at init (mhc.py)
    post_init=1.0,              # mHC's H_post bias at init: +post_init on one stream, -post_init on the rest
    kernel="auto",              # "auto" (Triton kernels on CUDA), "triton", "torch" (reference)
    recompute=False,            # HC/mHC: recompute streams and maps in the backward (less memory)
    stream_dtype="auto",        # HC/mHC: the n-stream state: "float32", "bfloat16", "auto" (bf16 if dtype is; a resume: the checkpoint's)
    dynamic=True,               # ablation: False keeps only the static part of the maps
    res_mixing=True,            # ablation: False fixes H_res = I
    # AdamW, cosine schedule with linear warmup
    learning_rate=6e-4,         # peak learning rate
    max_iters=600000,           # optimizer steps in all
    weight_decay=0.1,           # AdamW's, on matrices only
    beta1=0.9,                  # AdamW's betas, each in [0, 1)
    beta2=0.95,                 # (see beta1)
    grad_clip=1.0,              # clip the gradient norm to this; 0 disables clipping (the norm is still logged)
    decay_lr=True,              # False: a constant learning_rate
    warmup_iters=2000,          # linear warmup steps
    lr_decay_iters=-1,          # the cosine reaches min_lr here; -1: at max_iters
    min_lr=6e-5,                # the learning rate at the end of the decay
    # system
    device="auto",              # "auto", "cpu", "cuda", "cuda:1", ...
    dtype="auto",               # "auto" (bfloat16 on GPUs that have it), "float32", "bfloat16", "float16"
    compile=True,               # torch.compile the model (the first steps are slow while it compiles)
    compile_mode="auto",        # torch.compile's mode; "auto": "reduce-overhead" (CUDA graphs) on one GPU, else "default"
    seed=1337,                  # initial weights, data order and dropout
)
# settings a checkpoint must agree with to be resumed (dropout may change)
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "residual", "n_streams",
              "sinkhorn_iters", "res_init", "post_init", "stream_dtype", "dynamic", "res_mixing")
INIT_KEYS = ("res_init", "post_init")  # of those, the ones that only choose the initial weights
# of those, the connections' own: a residual model has none, so they cannot stop its resume
STREAM_KEYS = ("n_streams", "sinkhorn_iters", "res_init", "post_init", "stream_dtype", "dynamic", "res_mixing")


DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_system(c):
    """--device and --dtype (train.py's and sample.py's): the problem as one line, or None."""
    if c["dtype"] not in DTYPES:
        return f"--dtype={c['dtype']} is not known; use one of: {', '.join(DTYPES)}"
    if c["device"] == "auto":
        return None
    try:
        device = torch.device(c["device"])
    except RuntimeError:
        return f"--device={c['device']} is not a device; use auto, cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device={c['device']} but PyTorch sees no CUDA GPU; use --device=cpu"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return (f"--device={c['device']} but PyTorch sees {torch.cuda.device_count()} GPU(s); use cuda:0 ... "
                f"cuda:{torch.cuda.device_count() - 1}")
    return None


def check_settings(c):
    """Every setting that can be wrong on its own, checked before anything is read or written:
    the first problem as one line that names the setting and what it allows, or None."""
    if c["stream_dtype"] not in ("auto", "float32", "bfloat16"):
        return f"--stream_dtype={c['stream_dtype']} is not known; use auto, float32 or bfloat16"
    model_args = {k: c[k] for k in MODEL_KEYS if k != "vocab_size"}
    if model_args["stream_dtype"] == "auto":  # resolved once the device is known
        model_args["stream_dtype"] = "float32"
    try:  # the model's settings: GPTConfig checks them
        GPTConfig(**model_args, dropout=c["dropout"], kernel=c["kernel"], recompute=c["recompute"])
    except ValueError as e:
        return str(e)
    if c["init_from"] not in ("scratch", "resume"):
        return f"--init_from={c['init_from']} is not known; use one of: scratch, resume"
    problem = at_least(c, ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                           "max_iters"))
    if problem:
        return problem
    checks = [("learning_rate", c["learning_rate"] > 0, "must be above 0"),
              ("min_lr", 0 <= c["min_lr"] <= c["learning_rate"], f"must be in [0, learning_rate={c['learning_rate']}]"),
              ("weight_decay", c["weight_decay"] >= 0, "must be 0 or more"),
              ("beta1", 0 <= c["beta1"] < 1, "must be in [0, 1)"), ("beta2", 0 <= c["beta2"] < 1, "must be in [0, 1)"),
              ("grad_clip", c["grad_clip"] >= 0, "must be 0 or more (0 turns clipping off)"),
              ("warmup_iters", c["warmup_iters"] >= 0, "must be 0 or more"),
              ("lr_decay_iters", c["lr_decay_iters"] == -1 or c["lr_decay_iters"] >= 1,
               "must be -1 (decay over max_iters) or at least 1")]
    for key, ok, allowed in checks:
        if not ok:
            return f"--{key}={c[key]} {allowed}"
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:
        return "--wandb_log=True needs wandb: pip install wandb"
    return not_a_folder(c, "out_dir", "ckpt.pt and log.jsonl") or check_compile_mode(c) or check_system(c)


def check_compile_mode(c):
    """--compile_mode (train.py's and bench.py's): the problem as one line, or None."""
    if c["compile_mode"] not in COMPILE_MODES:
        return f"--compile_mode={c['compile_mode']} is not one of torch.compile's modes: {', '.join(COMPILE_MODES)}"
    return None


def auto_stream_dtype(dtype):
    """--stream_dtype=auto for a new run training in `dtype`: bf16 training gets a bf16 stream, half
    the bytes of the connections' hot path, with the same loss as an fp32 stream within seed noise
    at GPT-2 small's shape (RESULTS.md); anything else an fp32 one."""
    return "bfloat16" if dtype == "bfloat16" else "float32"


def torch_compile_mode(compile_mode, device_type, ddp=False):
    """--compile_mode as torch.compile's `mode`. "auto" replays each step as CUDA graphs on one GPU:
    an HC/mHC step launches many small kernels, and without the graphs the GPU waits on the CPU's
    launches for a quarter of the step or more (BENCHMARKS.md). Under DDP and on the CPU it is
    torch.compile's default."""
    if compile_mode == "auto":
        compile_mode = "reduce-overhead" if device_type == "cuda" and not ddp else "default"
    return None if compile_mode == "default" else compile_mode


def data_hint(data_dir):
    """How to make the token files train.py expects in data_dir."""
    if os.path.normpath(data_dir) == os.path.normpath(DEFAULTS["data_dir"]):
        return ("Make them with: python prepare_data.py --dataset=openwebtext (pip install datasets; ~9B tokens), "
                "or try tiny Shakespeare first: python prepare_data.py --dataset=shakespeare, then "
                "--data_dir=data/shakespeare")
    return (f"Make it with: python prepare_data.py --input=YOUR_TEXT --out_dir={data_dir} "
            f"(or --dataset=shakespeare --out_dir={data_dir})")


def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


# model settings whose default changed after they were added, at their old default
EARLIER_DEFAULTS = dict(post_init=0.0, stream_dtype="float32")


def load_checkpoint(path):
    """A checkpoint of train.py, on the CPU; a damaged or foreign file stops with one line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "model_args", "optimizer", "iter_num") if k not in ckpt]
    except Exception as e:  # truncated, empty, random bytes, not a torch file ...
        die(f"{path} is damaged or is not a checkpoint of train.py ({type(e).__name__}); "
            f"move it away (or restore a copy) and train again")
    if missing:
        die(f"{path} is not a checkpoint of train.py (it has no {', '.join(missing)}); point --out_dir at a train.py run")
    # a checkpoint from before a model setting existed was trained with that setting's default of
    # the time: today's, or the old one where the default has changed since
    ckpt["model_args"] = {**{k: DEFAULTS[k] for k in MODEL_KEYS if k != "vocab_size"}, **EARLIER_DEFAULTS,
                          **ckpt["model_args"]}
    return ckpt


def read_log(path):
    """The rows of a log.jsonl. A damaged line (a crash in mid-write leaves at most the last one
    half-written) is dropped with a warning: it never stops a resume."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if line.strip():
                        print(f"warning: {path} line {lineno} is damaged; dropped", file=sys.stderr)
    return rows


def get_lr(it, c):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = c["max_iters"] if c["lr_decay_iters"] < 0 else c["lr_decay_iters"]
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it >= decay_iters:
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / max(1, decay_iters - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


class Data:
    """Random windows of block_size + 1 tokens from train.bin / val.bin.

    The windows of step `it` are drawn from a generator seeded by (seed, it), and each process
    takes its own share of them: the batches are the same whatever the number of processes, and
    a resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, data_dir, block_size, batch_size, seed, device, extra_val=""):
        self.paths, self.tokens = {}, {}
        splits = {"train": os.path.join(data_dir, "train.bin"), "val": os.path.join(data_dir, "val.bin")}
        if extra_val:
            splits["extra_val"] = extra_val if extra_val.endswith(".bin") else os.path.join(extra_val, "val.bin")
        meta_path = os.path.join(data_dir, "meta.json")
        meta, self.vocab_size = {}, 50257  # without a meta.json: GPT-2's vocabulary
        if os.path.exists(meta_path):
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
                self.vocab_size = int(meta.get("vocab_size", 50257))
            except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
                die(f"{meta_path} is not the meta.json prepare_data.py writes; make the data again with prepare_data.py")
        if meta.get("dtype", "uint16") != "uint16":
            die(f"{meta_path} says dtype {meta['dtype']}; train.py reads uint16 token files (prepare_data.py's)")
        for split, path in splits.items():
            if not os.path.exists(path):
                die(f"{path} not found. {data_hint(os.path.dirname(path) or '.')}")
            self.check(path, meta.get(f"{split}_tokens") if split != "extra_val" else None)
            n = os.path.getsize(path) // 2
            if n < block_size + 1:
                die(f"{path} has {n} tokens, fewer than block_size+1={block_size + 1}; "
                    f"use a smaller --block_size or more text")
            self.paths[split], self.tokens[split] = path, n
        self.block_size, self.batch_size, self.seed, self.device = block_size, batch_size, seed, device

    def check(self, path, tokens=None):
        """A token file is uint16 ids below the vocabulary size: check its length (against
        meta.json's count when there is one) and a sample of ids spread through it."""
        size = os.path.getsize(path)
        fix = "make it with prepare_data.py (--input=YOUR_TEXT for a text file)"
        if size % 2:
            die(f"{path} has an odd number of bytes ({size:,}): it is not a file of uint16 token ids; {fix}")
        if tokens is not None and size != 2 * tokens:
            die(f"{path} holds {size // 2:,} tokens but meta.json says {tokens:,}: it is not the file prepare_data.py "
                f"wrote with that meta.json; {fix}")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        top = data[:2**26].max() if len(data) else 0  # the first 128 MB whole; batch() checks the rest
        if top >= self.vocab_size:
            self.bad_id(path, top)
        sample = np.asarray(data[np.linspace(0, len(data) - 1, min(len(data), 65536)).astype(np.int64)])
        low, high = sample & 0xFF, sample >> 8  # text read as uint16: both bytes printable characters
        text_like = ((low >= 32) | (low == 10)) & (low < 127) & ((high >= 32) | (high == 10)) & (high < 127)
        if len(sample) >= 64 and text_like.mean() > 0.9:
            die(f"{path} looks like text, not token ids; {fix}")

    def bad_id(self, path, token):
        die(f"{path} has token id {token}, beyond the vocabulary's {self.vocab_size}: it is not a token file of "
            f"this vocabulary; make it with prepare_data.py")

    def windows(self, split, count, key):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        return torch.randint(self.tokens[split] - self.block_size, (count,), generator=g)

    def batch(self, split, starts):
        # a fresh memmap per batch: a long-lived one grows the process's memory (nanoGPT's note)
        data = np.memmap(self.paths[split], dtype=np.uint16, mode="r")
        w = torch.stack([torch.from_numpy(data[i:i + self.block_size + 1].astype(np.int64)) for i in starts])
        if w.max() >= self.vocab_size:  # past what check() read whole (a few microseconds a batch)
            self.bad_id(self.paths[split], w.max().item())
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # inputs, and the same tokens one step on
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


def main(argv):
    c = settings(DEFAULTS, argv, check_settings)

    # --- processes and devices ---------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun?
    if ddp:
        import torch.distributed as dist
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        use_cuda = c["device"] != "cpu" and torch.cuda.is_available()
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    else:
        rank, world = 0, 1
        device = c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    master = rank == 0
    # the micro-steps of a step are shared out between the processes; with fewer micro-steps than
    # processes (or a count that does not divide) each process still takes a whole number of them
    accum = math.ceil(c["gradient_accumulation_steps"] / world)  # micro-steps per process
    micro_steps = accum * world
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = c["dtype"]
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # bf16/fp16 autocast for the sublayers; mhc.py keeps the maps in fp32 (the stream: --stream_dtype)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if c["residual"] != "residual":
        try:  # mhc.ops's checks (Triton installed, a GPU or the interpreter), before any data work
            mhc.ops(c["kernel"], torch.empty(0, device=device))
        except (RuntimeError, ValueError) as e:
            die(e)

    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    log_path = os.path.join(c["out_dir"], "log.jsonl")
    resume = c["init_from"] == "resume" or c["eval_only"]  # --eval_only evaluates the checkpoint
    if resume and not os.path.exists(ckpt_path):
        die(f"{'--eval_only evaluates' if c['eval_only'] else '--init_from=resume continues'} the checkpoint "
            f"in --out_dir, and there is none at {ckpt_path}; train one first, or point --out_dir at a run")
    if not resume and os.path.exists(ckpt_path):
        die(f"{ckpt_path} already exists; continue it with --init_from=resume, "
            f"or train into another --out_dir")
    ckpt = load_checkpoint(ckpt_path) if resume else None  # on the CPU: no GPU copy kept
    if c["eval_only"]:  # the model is the checkpoint's, whatever the settings say
        c.update({k: ckpt["model_args"][k] for k in MODEL_KEYS})
    elif resume:  # settings that only choose the initial weights: a resumed run's weights are past them
        c.update({k: ckpt["model_args"][k] for k in INIT_KEYS})
    if c["stream_dtype"] == "auto":  # a resumed run keeps its stream; a new one stores it as it trains
        c["stream_dtype"] = ckpt["model_args"]["stream_dtype"] if resume else auto_stream_dtype(dtype)
    data = Data(c["data_dir"], c["block_size"], c["batch_size"], c["seed"], device, c["extra_val"])
    tokens_per_iter = micro_steps * c["batch_size"] * c["block_size"]
    if master:
        if not c["eval_only"]:
            os.makedirs(c["out_dir"], exist_ok=True)
        if micro_steps != c["gradient_accumulation_steps"]:
            print(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} with {world} processes: each "
                  f"process takes {accum} micro-step(s), {micro_steps} a step in all")
        print(f"{world} process(es) on {device}, {dtype}; {tokens_per_iter:,} tokens per step")

    # --- model, optimizer, resume -------------------------------------------------------------
    if not c["eval_only"]:
        c["vocab_size"] = 64 * math.ceil(data.vocab_size / 64)  # pad GPT-2's 50257 to 50304 for speed
    model_args = {k: c[k] for k in MODEL_KEYS}
    iter_num, best_val_loss = 0, float("inf")
    if resume:
        diff = [k for k in MODEL_KEYS if ckpt["model_args"].get(k) != model_args[k]
                and not (c["residual"] == "residual" and k in STREAM_KEYS)]
        if diff:
            was = ", ".join(f"{k}={ckpt['model_args'].get(k)!r}" for k in diff)
            now = ", ".join(f"{k}={model_args[k]!r}" for k in diff)
            die(f"{ckpt_path} was trained with {was} but this run asks for {now}; "
                f"resume with the same settings (and config file), or use another --out_dir")
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        if iter_num >= c["max_iters"] and not c["eval_only"]:
            die(f"{ckpt_path} has trained {iter_num} steps, --max_iters={c['max_iters']}: nothing left to do; "
                f"raise --max_iters to train on")
    torch.manual_seed(c["seed"])  # the same initial weights in every process and every run
    try:
        model = GPT(GPTConfig(**model_args, dropout=c["dropout"], kernel=c["kernel"],
                              recompute=c["recompute"]))
    except ValueError as e:
        die(e)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        del ckpt  # free the CPU copy
    raw_model = model
    if master:
        print(f"{model_args['residual']} model: {model.get_num_params() / 1e6:.2f}M parameters "
              f"({model.num_connection_params():,} in the connections"
              + (f", a {c['stream_dtype']} stream)" if c["residual"] != "residual" else ")"))
    if c["compile"]:
        mode = torch_compile_mode(c["compile_mode"], device_type, ddp)
        if master:
            print(f"compiling the model ({mode or 'default'} mode)... (the first step takes a while)")
        model = torch.compile(model, mode=mode)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # --- logging ---------------------------------------------------------------------------------
    wandb = None
    if master and not c["eval_only"]:
        if resume:  # keep the log as the uninterrupted run would have it
            rows = [r for r in read_log(log_path) if r.get("iter", 0) < iter_num]
        else:
            rows = []
            if os.path.exists(log_path):  # an earlier run's log (without a checkpoint): kept aside, never lost
                os.replace(log_path, next(p for p in (f"{log_path}.prev{k or ''}" for k in range(10**6))
                                          if not os.path.exists(p)))
        with open(log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(log_path + ".tmp", log_path)
        if c["wandb_log"]:
            import wandb
            wandb.init(project=c["wandb_project"], name=c["wandb_run_name"] or None, config=c)

    def log(row):
        if master and not c["eval_only"]:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if wandb is not None:
                wandb.log(row, step=row["iter"])

    def all_mean(t):
        if ddp:
            dist.all_reduce(t)
            t /= world
        return t

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over the same eval_iters batches at every eval (a fixed generator per
        split), shared out between the processes and summed across them."""
        out = {}
        model.eval()
        for key, split in enumerate(data.paths):  # train, val, and extra_val if given
            starts = data.windows(split, c["eval_iters"] * c["batch_size"], key=-1 - key)
            total = torch.zeros(2, device=device)
            for k in range(rank, c["eval_iters"], world):
                X, Y = data.batch(split, starts[k * c["batch_size"]:(k + 1) * c["batch_size"]])
                with ctx:
                    _, loss = model(X, Y)
                total += torch.stack([loss.float(), torch.ones((), device=device)])
            if ddp:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        model.train()
        return out

    @torch.no_grad()
    def stream_diagnostics():
        """Gains and distances of the composite H_res (mhc.py), on the first val batch."""
        X, _ = data.batch("val", data.windows("val", c["batch_size"], key=-1)[:c["batch_size"]])
        raw_model.eval()
        with ctx:
            mats = raw_model.mixing_matrices(X)
        raw_model.train()
        fwd, bwd = mhc.gain_magnitude(mats)
        to_id, to_unif = mhc.composite_distance(mats)
        by_depth = [list(mhc.gain_magnitude(mats[:d + 1])) for d in range(len(mats))]
        return dict(fwd_gain=fwd, bwd_gain=bwd, dist_identity=to_id, dist_uniform=to_unif,
                    gain_by_depth=by_depth, h_res=[[[round(v, 5) for v in r] for r in m.tolist()] for m in mats])

    saved_iter = iter_num if resume else None  # the step ckpt.pt holds

    def kept():
        """What a user still has when a run stops early (a non-finite loss, Ctrl-C)."""
        if c["eval_only"]:
            return ""
        if saved_iter is None:
            return "No checkpoint was saved yet. "
        return f"The last good checkpoint stays: {ckpt_path} holds step {saved_iter}; continue it with --init_from=resume. "

    # --- the loop --------------------------------------------------------------------------------
    t0, last_log_iter, start_iter, running_mfu = time.time(), iter_num, iter_num, -1.0
    try:
        while True:
            lr = get_lr(iter_num, c) if c["decay_lr"] else c["learning_rate"]
            for group in optimizer.param_groups:
                group["lr"] = lr

            if iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"] or c["eval_only"]:
                losses = estimate_loss()
                row = dict(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr,
                           tokens=iter_num * tokens_per_iter)
                if "extra_val" in losses:
                    row["extra_val_loss"] = losses["extra_val"]
                if not all(map(math.isfinite, losses.values())):
                    die(f"the validation loss is {losses['val']} at iter {iter_num}; stopping. {kept()}"
                        f"Try a lower --learning_rate, --grad_clip=1.0 or --dtype=bfloat16")
                if master:
                    if c["residual"] != "residual":
                        row.update(stream_diagnostics())
                    gains = f", gain fwd {row['fwd_gain']:.3g} bwd {row['bwd_gain']:.3g}" if "fwd_gain" in row else ""
                    print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{gains}")
                    log(row)
                    best_val_loss = min(best_val_loss, losses["val"])
                    if iter_num > 0 and not c["eval_only"]:
                        save_atomic(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                         scaler=scaler.state_dict(), model_args=model_args, iter_num=iter_num,
                                         best_val_loss=best_val_loss, config=c), ckpt_path)
                        saved_iter = iter_num
            if iter_num >= c["max_iters"] or c["eval_only"]:
                break

            # One optimizer step = micro_steps micro-batches, shared by the processes. The RNG
            # (dropout) is reseeded from (seed, step, rank), so a resumed run repeats exactly.
            torch.manual_seed(c["seed"] + 7919 * iter_num + rank)
            starts = data.windows("train", micro_steps * c["batch_size"], key=iter_num)
            loss_sum = torch.zeros((), device=device)
            torch.compiler.cudagraph_mark_step_begin()  # with CUDA graphs: the last step's outputs are done with
            for micro in range(accum):
                k = rank * accum + micro
                X, Y = data.batch("train", starts[k * c["batch_size"]:(k + 1) * c["batch_size"]])
                if ddp:  # all-reduce the gradients only on the last micro-step (set before the forward)
                    model.require_backward_grad_sync = micro == accum - 1
                with ctx:
                    _, loss = model(X, Y)
                    loss = loss / accum
                loss_sum += loss.detach().float()
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"] if c["grad_clip"] > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1

            if (iter_num - 1) % c["log_interval"] == 0 or iter_num == c["max_iters"]:
                loss_val = all_mean(loss_sum).item()  # the step's mean loss over all processes
                if not math.isfinite(loss_val):
                    die(f"the training loss is {loss_val} at iter {iter_num - 1}; stopping. {kept()}"
                        f"Try a lower --learning_rate or --dtype=bfloat16")
                dt = (time.time() - t0) / (iter_num - last_log_iter)
                t0, last_log_iter = time.time(), iter_num
                mfu = raw_model.estimate_mfu(c["batch_size"] * accum, dt, device)
                if mfu is not None and iter_num - start_iter > 5:  # skip the compile / warm-up steps
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                row = dict(iter=iter_num - 1, loss=loss_val, lr=lr, grad_norm=grad_norm.item(),
                           ms=1000 * dt, tokens_per_s=tokens_per_iter / dt, mfu=running_mfu if running_mfu >= 0 else None)
                if device_type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if master:
                    note = "  (includes compilation)" if iter_num - start_iter == 1 and c["compile"] else ""
                    mfu_text = f", mfu {running_mfu:.1%}" if running_mfu >= 0 else ""
                    print(f"iter {iter_num - 1}: loss {loss_val:.4f}, lr {lr:.2e}, grad norm {row['grad_norm']:.3f}, "
                          f"{1000 * dt:.1f} ms, {tokens_per_iter / dt:,.0f} tok/s{mfu_text}{note}", flush=True)
                    log(row)
    except KeyboardInterrupt:  # Ctrl-C: say what is kept, without a traceback
        if master:
            print(f"\nstopped at step {iter_num} (Ctrl-C). {kept()}", file=sys.stderr, flush=True)
        sys.exit(130)

    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
