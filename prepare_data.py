"""
Text -> GPT-2 BPE tokens (tiktoken) -> train.bin / val.bin (uint16 memmaps) + meta.json.

    python prepare_data.py --dataset=shakespeare           # tiny Shakespeare (1 MB; works offline)
    python prepare_data.py --dataset=openwebtext           # OpenWebText (~9B tokens, needs `datasets`)
    python prepare_data.py --input=PATH [--out_dir=DIR]    # local text: a .txt/.txt.xz file, a .jsonl
                                                           # file ({"text": ...} per line), a folder
                                                           # of them, or a glob like 'wiki_*.txt.xz'
Every document is followed by GPT-2's end-of-text token. The last --val_fraction of the token
stream becomes val.bin. Tokens are streamed to disk in chunks (never the whole corpus in memory),
into temporary files that are renamed only when complete: an interrupted run leaves no file that
looks whole. Output goes to data/<name> unless --out_dir says otherwise.
"""
import glob
import json
import lzma
import os
import sys
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_COPY = os.path.join(HERE, "assets", "tinyshakespeare.txt")  # the same file, shipped


def get_tokenizer():
    """tiktoken's GPT-2 encoding. tiktoken downloads its vocabulary on first use into
    TIKTOKEN_CACHE_DIR; unless that folder already holds it, we point tiktoken at the copy shipped
    in assets/tiktoken (the same files), so no network is ever needed."""
    shipped = os.path.join(HERE, "assets", "tiktoken")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache or not all(os.path.exists(os.path.join(cache, f)) for f in os.listdir(shipped)):
        os.environ["TIKTOKEN_CACHE_DIR"] = shipped
    import tiktoken
    return tiktoken.get_encoding("gpt2")


class PrepareError(Exception):
    """A problem with the user's input, reported as one line."""


# ----------------------------------------------------------------------------------------------
# sources: each yields documents (strings)

def _read_text(path):
    try:
        if path.endswith(".xz"):
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise PrepareError(f"{path} is not UTF-8 text; give a .txt, .txt.xz or .jsonl file of text")
    except lzma.LZMAError as e:
        raise PrepareError(f"{path} is not a valid .xz file ({e})")


def local_files(path):
    """The files that --input=PATH names, in a fixed (sorted) order."""
    exts = (".txt", ".txt.xz", ".jsonl", ".jsonl.xz")
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(exts))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise PrepareError(f"--input={path}: no such file or folder")
    if not files:
        raise PrepareError(f"--input={path}: found no {', '.join(exts)} files there")
    return files


def local_documents(path, blank_line_docs):
    """A .txt file is one document, or one per blank-line-separated block with
    --blank_line_docs=True; a .jsonl file gives one document per line (its "text" field)."""
    for file in local_files(path):
        text = _read_text(file)
        if ".jsonl" in file:
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise PrepareError(f"{file}:{lineno}: expected a JSON object with a \"text\" field")
                if doc.strip():
                    yield doc
        elif blank_line_docs:
            yield from (d for d in text.split("\n\n") if d.strip())
        elif text.strip():
            yield text


def shakespeare_documents():
    """Tiny Shakespeare as one document: downloaded, or the identical copy shipped in assets/."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=10) as r:
            text = r.read().decode("utf-8")
        print(f"downloaded tiny Shakespeare ({len(text):,} characters)")
    except Exception as e:  # offline, proxy, DNS...: the shipped copy is the same text
        print(f"could not download tiny Shakespeare ({type(e).__name__}); using {SHAKESPEARE_COPY}")
        text = _read_text(SHAKESPEARE_COPY)
    yield text


def openwebtext_documents(num_proc):
    """OpenWebText from the Hugging Face hub. The original `openwebtext` loading script fails with
    datasets >= 4 ("Dataset scripts are no longer supported"), so we load the hub's script-free
    parquet conversion of the same data."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise PrepareError("--dataset=openwebtext needs Hugging Face datasets: pip install datasets")
    try:
        ds = load_dataset("Skylion007/openwebtext", revision="refs/convert/parquet",
                          split="train", num_proc=num_proc)
    except Exception as e:
        raise PrepareError(f"could not download OpenWebText ({type(e).__name__}: {str(e)[:200]}). "
                           f"Download it on a machine with internet, or give local text with --input=PATH")
    print(f"OpenWebText: {len(ds):,} documents")
    for batch in ds.iter(batch_size=1024):
        yield from batch["text"]


# ----------------------------------------------------------------------------------------------
# tokenize and write

def _batched(docs, size):
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_tokens(docs, out_dir, val_fraction, source, num_proc=8, chunk_docs=256):
    """Tokenize docs (each + end-of-text) into out_dir/{train,val}.bin and meta.json."""
    enc = get_tokenizer()
    os.makedirs(out_dir, exist_ok=True)
    train_path, val_path, meta_path = (os.path.join(out_dir, f) for f in ("train.bin", "val.bin", "meta.json"))
    tmp_train, tmp_val, tmp_meta = (p + ".tmp" for p in (train_path, val_path, meta_path))
    total, ndocs, t0 = 0, 0, time.time()
    last_print, end = t0, "\r" if sys.stdout.isatty() else "\n"
    try:
        # pass 1: every token goes to the temporary train file, a chunk of documents at a time
        with open(tmp_train, "wb") as f:
            for batch in _batched(docs, chunk_docs):
                ids = enc.encode_ordinary_batch(batch, num_threads=num_proc)  # threads, GIL-free
                arr = np.concatenate([np.array(doc + [enc.eot_token], dtype=np.uint16) for doc in ids])
                f.write(arr.tobytes())
                total, ndocs = total + len(arr), ndocs + len(batch)
                if time.time() - last_print > 5:
                    last_print = time.time()
                    print(f"{ndocs:,} documents, {total:,} tokens, {total / (last_print - t0 + 1e-9):,.0f} tok/s",
                          end=end, flush=True)
        print(f"{ndocs:,} documents, {total:,} tokens in {time.time() - t0:.1f}s" + " " * 20)
        if total == 0:
            raise PrepareError(f"no text found in {source}: the input is empty")
        # pass 2: the last val_fraction of the stream moves to val.bin; train.bin is truncated
        n_val = max(1, int(round(total * val_fraction)))
        n_train = total - n_val
        if n_train < 2 or n_val < 2:
            raise PrepareError(f"{source} gives only {total} tokens; too little text to split into "
                               f"train and val (val_fraction={val_fraction})")
        tokens = np.memmap(tmp_train, dtype=np.uint16, mode="r")
        with open(tmp_val, "wb") as f:
            for start in range(n_train, total, 1 << 24):
                f.write(tokens[start:min(start + (1 << 24), total)].tobytes())
        del tokens
        os.truncate(tmp_train, n_train * 2)
        meta = dict(vocab_size=enc.n_vocab, eot_token=enc.eot_token, tokenizer="gpt2", dtype="uint16",
                    train_tokens=n_train, val_tokens=n_val, documents=ndocs, source=source)
        with open(tmp_meta, "w") as f:
            json.dump(meta, f, indent=1)
        for tmp, final in ((tmp_train, train_path), (tmp_val, val_path), (tmp_meta, meta_path)):
            os.replace(tmp, final)
    finally:
        for tmp in (tmp_train, tmp_val, tmp_meta):
            if os.path.exists(tmp):
                os.remove(tmp)
    print(f"wrote {train_path} ({n_train:,} tokens), {val_path} ({n_val:,} tokens), {meta_path}")
    return meta


DEFAULTS = dict(
    dataset="",             # "shakespeare" or "openwebtext" (give this or --input)
    input="",               # local text: a file, a folder or a glob (give this or --dataset)
    out_dir="",             # where train.bin, val.bin and meta.json go ("": data/<name>)
    val_fraction=-1.0,      # the share of tokens for val.bin (-1: 0.0005 for OpenWebText, 0.1 otherwise)
    blank_line_docs=False,  # a .txt file holds one document per blank-line-separated block
    num_proc=8,             # tokenizer processes
)


def check_settings(cfg):
    """The first bad setting as one line, or None."""
    from configurator import at_least, not_a_folder
    problem = at_least(cfg, ("num_proc",)) or not_a_folder(cfg, "out_dir", "the token files")
    if problem:
        return problem
    if bool(cfg["dataset"]) == bool(cfg["input"]):
        return "give exactly one of --dataset=shakespeare|openwebtext or --input=PATH"
    return None


def main(argv):
    from configurator import settings
    cfg = settings(DEFAULTS, argv, check_settings, allow_files=False)
    name = cfg["dataset"] or os.path.basename(os.path.normpath(cfg["input"])).split(".")[0].strip("*?[]") or "local"
    out_dir = cfg["out_dir"] or os.path.join(HERE, "data", name)
    val_fraction = cfg["val_fraction"]
    if val_fraction < 0:  # nanoGPT's splits: 0.05% of OpenWebText, 10% of small text
        val_fraction = 0.0005 if cfg["dataset"] == "openwebtext" else 0.1
    if not 0 < val_fraction < 1:
        sys.exit(f"error: --val_fraction={val_fraction} must be between 0 and 1")
    try:
        if cfg["dataset"] == "shakespeare":
            docs, source = shakespeare_documents(), "tiny shakespeare"
        elif cfg["dataset"] == "openwebtext":
            docs, source = openwebtext_documents(cfg["num_proc"]), "openwebtext"
        elif cfg["dataset"]:
            sys.exit(f"error: --dataset={cfg['dataset']} is not known; use shakespeare or openwebtext, "
                     f"or --input=PATH for local text")
        else:
            docs, source = local_documents(cfg["input"], cfg["blank_line_docs"]), cfg["input"]
        write_tokens(docs, out_dir, val_fraction, source, num_proc=cfg["num_proc"])
    except PrepareError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
