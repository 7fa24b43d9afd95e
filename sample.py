"""
Generate text from a trained checkpoint.

    python sample.py --out_dir=out-quick --start="ROMEO:" --num_samples=2 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt      # the prompt from a file
"""
import os
import sys

import torch

from configurator import ConfigError, configure
from model import GPT, GPTConfig
from prepare_data import get_tokenizer

DEFAULTS = dict(
    out_dir="out",          # where ckpt.pt is
    start="\n",             # the prompt, or FILE:path to read it from a file
    num_samples=3,
    max_new_tokens=200,
    temperature=0.8,        # < 1 sharper, > 1 more random
    top_k=200,              # keep only the top_k most likely tokens (0: all)
    seed=1337,
    device="auto",
    dtype="auto",           # "auto" (bfloat16 on GPUs that have it), "float32", "bfloat16", "float16"
)


def main(argv):
    c = dict(DEFAULTS)
    try:
        configure(c, argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    device = c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = c["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        sys.exit(f"error: --dtype={dtype} is not known; use float32, bfloat16 or float16")

    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    if not os.path.exists(ckpt_path):
        sys.exit(f"error: no checkpoint at {ckpt_path}; train one with train.py, or point --out_dir at it")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    del ckpt
    model.eval().to(device)

    enc = get_tokenizer()
    start = c["start"]
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    ids = enc.encode(start, allowed_special={"<|endoftext|>"})
    if not ids:
        sys.exit("error: --start is empty; give a prompt, e.g. --start=\"\\n\"")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]

    torch.manual_seed(c["seed"])
    ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else torch.autocast(device_type, enabled=False)
    with ctx:
        for _ in range(c["num_samples"]):
            y = model.generate(x, c["max_new_tokens"], temperature=c["temperature"], top_k=c["top_k"] or None)
            print(enc.decode([t for t in y[0].tolist() if t < enc.n_vocab]))  # padded ids are not text
            print("---------------")


if __name__ == "__main__":
    main(sys.argv[1:])
