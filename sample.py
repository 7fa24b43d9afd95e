"""
Generate text from a trained checkpoint, printing it as it is sampled (Ctrl-C stops and keeps
what was printed).

    python sample.py --out_dir=out-quick --start="ROMEO:" --num_samples=2 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt      # the prompt from a file
"""
import codecs
import os
import sys

import torch

from configurator import at_least, die, settings
from model import GPT, GPTConfig
from prepare_data import get_tokenizer
from train import check_system, load_checkpoint

DEFAULTS = dict(
    out_dir="out",          # where ckpt.pt is
    start="\n",             # the prompt, or FILE:path to read it from a file
    num_samples=3,          # how many samples, one after another
    max_new_tokens=200,     # tokens to generate per sample
    temperature=0.8,        # < 1 sharper, > 1 more random; 0 always takes the most likely token
    top_k=200,              # keep only the top_k most likely tokens (0: all)
    seed=1337,              # the sampling's random seed
    device="auto",          # "auto", "cpu", "cuda", "cuda:1", ...
    dtype="auto",           # "auto" (bfloat16 on GPUs that have it), "float32", "bfloat16", "float16"
)


def check_settings(c):
    """The first bad setting as one line, or None."""
    problem = at_least(c, ("num_samples", "max_new_tokens")) or at_least(c, ("top_k",), 0, " (0 keeps all tokens)")
    if problem:
        return problem
    if c["temperature"] < 0:
        return f"--temperature={c['temperature']} must be 0 or more (0: always the most likely token)"
    return check_system(c)


def read_prompt(start):
    """--start, or the text of the file that --start=FILE:path names."""
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        die(f"--start={start}: no such file")
    except UnicodeDecodeError:
        die(f"--start={start}: the file is not UTF-8 text")
    except OSError as e:
        die(f"--start={start}: cannot read it ({e.strerror})")


def main(argv):
    c = settings(DEFAULTS, argv, check_settings)
    prompt = read_prompt(c["start"])
    device = c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = c["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"

    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    if not os.path.exists(ckpt_path):
        die(f"no checkpoint at {ckpt_path}; train one with train.py, or point --out_dir at it")
    ckpt = load_checkpoint(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    del ckpt
    model.eval().to(device)

    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    if not ids:
        die("--start is empty; give a prompt, e.g. --start=\"\\n\"")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]

    torch.manual_seed(c["seed"])
    ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else torch.autocast(device_type, enabled=False)
    prompt_text = enc.decode(ids)  # printed before each sample
    try:
        with ctx:
            for _ in range(c["num_samples"]):
                # bytes in, text out: a character split over two tokens prints once both are in
                text = codecs.getincrementaldecoder("utf-8")(errors="replace")
                print(prompt_text, end="", flush=True)
                for t in model.generate_tokens(x, c["max_new_tokens"], c["temperature"], c["top_k"] or None):
                    t = t.item()
                    if t < enc.n_vocab:  # the padded ids beyond GPT-2's 50257 are not text
                        print(text.decode(enc.decode_single_token_bytes(t)), end="", flush=True)
                print(text.decode(b"", final=True))
                print("---------------", flush=True)
    except KeyboardInterrupt:  # what was printed stays on the screen
        print("\n(stopped)", flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
