"""data.py under concurrency, kills and bad input: preparation is locked and atomic, load_tokens accepts only
finished datasets, and every refusal is a one-line error that says what to do."""
import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import data
from conftest import ROOT

FILES = ("train.bin", "val.bin", "meta.json")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    data.get_tokenizer()  # cached before the data dir moves
    d = tmp_path / "data"
    monkeypatch.setattr(data, "DATA_DIR", str(d))
    return d


def write_corpus(folder, n_docs, word="document"):
    """A folder of n_docs small .txt files; returns its text:PATH dataset name."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i in range(n_docs):
        (folder / f"{i:03d}.txt").write_text(f"{word} {i} " * 200)
    return f"text:{folder}"


def snapshot(dataset_dir):
    """The bytes of every file in a dataset directory (the lock file aside)."""
    return {f: (dataset_dir / f).read_bytes() for f in sorted(os.listdir(dataset_dir)) if f != "prepare.lock"}


def exit_message(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return str(e.value)


def forked(target):
    """Run target() in a forked child process; returns its exit code (-9 when it SIGKILLed itself)."""
    p = multiprocessing.get_context("fork").Process(target=target)
    p.start()
    p.join(60)
    return p.exitcode


# -----------------------------------------------------------------------------
# concurrency

def test_concurrent_preparations_equal_one(tmp_path, data_dir, monkeypatch):
    name = write_corpus(tmp_path / "corpus", 60)
    data.prepare(name)
    single = snapshot(data_dir / "text-corpus")
    assert set(single) == set(FILES)

    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data2"))
    go = multiprocessing.get_context("fork").Event()

    def prepare_on_go():
        go.wait()
        data.prepare(name)

    procs = [multiprocessing.get_context("fork").Process(target=prepare_on_go) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()  # both start at once
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert snapshot(tmp_path / "data2" / "text-corpus") == single


def test_cli_waits_for_a_running_preparation(tmp_path):
    """python data.py (DATA_DIR from the environment) waits on the lock, and load_tokens says why it refuses."""
    name = write_corpus(tmp_path / "corpus", 5)
    data_dir = tmp_path / "data"
    data.get_tokenizer()  # the real data dir has the tokenizer files now; the subprocess gets a copy
    shutil.copytree(os.path.join(data.DATA_DIR, "tokenizer"), data_dir / "tokenizer")
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    with data.locked(str(data_dir / "text-corpus")):
        proc = subprocess.Popen([sys.executable, "data.py", name], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout.readline().startswith("waiting for another process that prepares")
        assert not (data_dir / "text-corpus" / "train.bin").exists()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(data, "DATA_DIR", str(data_dir))
            assert exit_message(data.load_tokens, "text-corpus") == (
                "error: dataset 'text-corpus' is not prepared; another process is preparing it now, "
                "wait for it to finish")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.splitlines()[-1] == "train with: python train_full.py --dataset text-corpus"
    assert set(snapshot(data_dir / "text-corpus")) == set(FILES)


def test_a_loader_that_waited_does_not_prepare_shakespeare_again(data_dir, monkeypatch, capsys):
    calls, docs = [], ["To be.", "Or not."]
    monkeypatch.setattr(data, "shakespeare_docs", lambda: calls.append(1) or iter(docs))
    loaded = {}
    with data.locked(str(data_dir / "shakespeare")):
        loader = threading.Thread(target=lambda: loaded.update(data.load_tokens("shakespeare")))
        loader.start()
        out, deadline = "", time.time() + 30
        while "waiting for another process" not in out and time.time() < deadline:
            time.sleep(0.01)
            out += capsys.readouterr().out
        assert "waiting for another process" in out
        data.write_dataset("shakespeare")  # what the process holding the lock would do
    loader.join(30)
    assert len(calls) == 1
    assert len(loaded["train"]) + len(loaded["val"]) == sum(len(data.get_tokenizer().encode(d)) + 1 for d in docs)


def test_an_open_memmap_keeps_its_contents_while_the_dataset_is_re_prepared(tmp_path, data_dir):
    name = write_corpus(tmp_path / "corpus", 20, "old")
    data.prepare(name)
    old = data.load_tokens(name)
    before = np.array(old["train"])
    write_corpus(tmp_path / "corpus", 3, "new")  # smaller: a rewrite in place would SIGBUS the old memmap
    data.prepare(name)
    assert np.array_equal(old["train"], before)
    assert len(data.load_tokens(name)["train"]) < len(before)


# -----------------------------------------------------------------------------
# kills and failures

def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("point", ["tokenizing", "tokenizing with 2 workers", "commit 0", "commit 1", "commit 2"])
def test_a_killed_preparation_leaves_the_previous_dataset_or_a_refused_one(tmp_path, data_dir, point):
    name = write_corpus(tmp_path / "corpus", 10, "old")
    data.prepare(name)
    d = data_dir / "text-corpus"
    old = snapshot(d)
    write_corpus(tmp_path / "corpus", 15, "new")

    def prepare_and_die():  # runs in a forked child, so it may patch data and os for good
        if point.startswith("tokenizing"):
            text_docs = data.text_docs

            def dying_docs(path):
                for i, doc in enumerate(text_docs(path)):
                    if i == 5:
                        kill_myself()
                    yield doc
            data.text_docs = dying_docs
            data.BATCH_DOCS = 2  # the workers hold batches when the kill comes
        else:  # "commit k": killed at the k-th rename, after meta.json was removed
            replace, renamed = os.replace, []

            def dying_replace(src, dst):
                if len(renamed) == int(point[-1]):
                    kill_myself()
                renamed.append(src)
                replace(src, dst)
            os.replace = dying_replace
        data.prepare(name, workers=2 if point.endswith("workers") else 1)

    assert forked(prepare_and_die) == -signal.SIGKILL
    after = snapshot(d)
    if point.startswith("tokenizing"):
        assert "train.bin.tmp" in after  # what a SIGKILL leaves: load_tokens ignores it
        assert {f: after[f] for f in FILES} == old
        assert len(data.load_tokens(name)["val"]) == len(np.frombuffer(old["val.bin"], np.uint16))
    else:
        assert "meta.json" not in after
        assert exit_message(data.load_tokens, name) == (
            "error: dataset 'text:" + str(tmp_path / "corpus") + "' is unfinished (no meta.json: its preparation "
            "was interrupted, or predates meta.json); run: python data.py " + name)
    data.prepare(name)  # the next preparation overwrites what the kill left
    new = snapshot(d)
    assert set(new) == set(FILES)
    for f in ("train.bin", "val.bin"):  # whatever the kill left in place is a complete old or new file
        if f in after:
            assert after[f] in (old[f], new[f])


def test_a_killed_preparation_of_c4_shards_with_2_workers_leaves_the_previous_dataset(tmp_path, data_dir):
    from test_data import write_c4_shards
    write_c4_shards(tmp_path / "c4", "validation", [["val one", "val two"]])
    write_c4_shards(tmp_path / "c4", "train", [[f"old document {i}" for i in range(10)]])
    data.prepare("c4", tokenizer="bytes", c4_dir=str(tmp_path / "c4"), workers=2)
    old = snapshot(data_dir / "c4-bytes")
    write_c4_shards(tmp_path / "c4", "train", [[f"new document {i}" for i in range(8)] for _ in range(2)])

    def prepare_and_die():  # in a forked child: killed in the second shard, while the workers hold batches
        c4_docs = data.c4_docs

        def dying_docs(folder, split):
            for i, doc in enumerate(c4_docs(folder, split)):
                if split == "train" and i == 11:
                    kill_myself()
                yield doc
        data.c4_docs, data.BATCH_DOCS = dying_docs, 2
        data.prepare("c4", tokenizer="bytes", c4_dir=str(tmp_path / "c4"), workers=2)

    assert forked(prepare_and_die) == -signal.SIGKILL
    after = snapshot(data_dir / "c4-bytes")
    assert {f: after[f] for f in FILES} == old and "train.bin.tmp" in after
    assert bytes(data.load_tokens("c4-bytes")["train"][:14].astype(np.uint8)) == b"old document 0"


def test_a_failed_preparation_leaves_no_files(tmp_path, data_dir, monkeypatch):
    name = write_corpus(tmp_path / "corpus", 10)
    text_docs = data.text_docs

    def failing_docs(path):
        for i, doc in enumerate(text_docs(path)):
            if i == 5:
                raise RuntimeError("disk on fire")
            yield doc
    monkeypatch.setattr(data, "text_docs", failing_docs)
    with pytest.raises(RuntimeError):
        data.prepare(name)
    assert not (data_dir / "text-corpus").exists()  # no folder, no lock file: as if it had never run
    assert exit_message(data.load_tokens, "text-corpus").startswith("error: dataset 'text-corpus' is not prepared")

    monkeypatch.setattr(data, "text_docs", text_docs)
    data.prepare(name)
    previous = snapshot(data_dir / "text-corpus")
    monkeypatch.setattr(data, "text_docs", failing_docs)
    with pytest.raises(RuntimeError):
        data.prepare(name)
    assert snapshot(data_dir / "text-corpus") == previous


# -----------------------------------------------------------------------------
# meta.json, and what load_tokens refuses

def test_meta_json_records_the_finished_dataset(tmp_path, data_dir):
    name = write_corpus(tmp_path / "corpus", 4)
    data.prepare(name, max_tokens=1000)
    d = data_dir / "text-corpus"
    meta = json.loads((d / "meta.json").read_text())
    assert meta == {"tokens": {"train": 900, "val": 100},
                    "sha256": {s: hashlib.sha256((d / f"{s}.bin").read_bytes()).hexdigest() for s in ("train", "val")},
                    "tokenizer": "gpt2", "vocab_size": 50257, "source": str(tmp_path / "corpus"), "max_tokens": 1000}
    assert set(snapshot(d)) == set(FILES)  # no *.tmp left behind


def test_load_refuses_a_dataset_without_meta_json(data_dir):
    d = data_dir / "c4"
    d.mkdir(parents=True)
    for split in ("train", "val"):  # as the old data.py, or a killed one, left it
        np.arange(1000, dtype=np.uint16).tofile(d / f"{split}.bin")
    assert exit_message(data.load_tokens, "c4") == (
        "error: dataset 'c4' is unfinished (no meta.json: its preparation was interrupted, or predates meta.json); "
        "run: python data.py c4")


def test_an_old_shakespeare_without_meta_json_is_prepared_again(data_dir, monkeypatch):
    d = data_dir / "shakespeare"
    d.mkdir(parents=True)
    for split in ("train", "val"):
        np.arange(1000, dtype=np.uint16).tofile(d / f"{split}.bin")
    monkeypatch.setattr(data, "shakespeare_docs", lambda: iter(["To be, or not to be."] * 20))
    tokens = data.load_tokens("shakespeare")
    assert (d / "meta.json").exists()
    per_doc = len(data.get_tokenizer().encode("To be, or not to be.")) + 1
    assert len(tokens["train"]) + len(tokens["val"]) == 20 * per_doc


@pytest.mark.parametrize("damage", ["append", "truncate", "delete"])
def test_load_refuses_files_that_disagree_with_meta_json(tmp_path, data_dir, damage):
    name = write_corpus(tmp_path / "corpus", 2)
    data.prepare(name)
    d = data_dir / "text-corpus"
    n_train, n_val = json.loads((d / "meta.json").read_text())["tokens"].values()
    if damage == "append":
        with open(d / "train.bin", "ab") as f:
            f.write(b"\0\0")
        found = f"train.bin has {2 * n_train + 2:,} bytes, but meta.json records {n_train:,} tokens"
    elif damage == "truncate":
        os.truncate(d / "train.bin", 1001)
        found = f"train.bin has 1,001 bytes, but meta.json records {n_train:,} tokens"
    else:
        os.remove(d / "val.bin")
        found = f"val.bin is missing, but meta.json records {n_val:,} tokens"
    message = exit_message(data.load_tokens, "text-corpus")
    assert message.startswith(f"error: dataset 'text-corpus' is damaged ({found} = ")
    assert message.endswith("; run: python data.py text:PATH, with PATH your .txt file or folder named 'corpus'")


# -----------------------------------------------------------------------------
# one-line errors, and the text corpus

def prepared(tmp_path, *texts):
    """The text-corpus dataset of a folder holding these texts, prepared."""
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "corpus" / f"{i}.txt").write_text(text)
    data.prepare(f"text:{tmp_path / 'corpus'}")
    return "text-corpus"


def cli(*argv):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["data.py", *argv])
        data.main()


def binary_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    cli(f"text:{tmp_path / 'corpus'}")


def c4_folder(tmp_path, validation=b"not gzip"):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-train.00000-of-01024.json.gz").write_bytes(b"")
    if validation is not None:
        (tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz").write_bytes(validation)
    cli("c4", "--c4-dir", str(tmp_path / "c4"), "--tokenizer", "bytes")


ERRORS = {
    "unprepared text dataset": (
        lambda tmp_path: data.load_tokens("text-my_corpus"),
        "error: dataset 'text-my_corpus' is not prepared; run: python data.py text:PATH, "
        "with PATH your .txt file or folder named 'my_corpus'"),
    "unknown dataset to load": (
        lambda tmp_path: data.load_tokens("tiny-stories"),
        "error: dataset 'tiny-stories' is not prepared; run: python data.py NAME, "
        "with NAME one of shakespeare, c4, fineweb-edu, text:PATH"),
    "unknown dataset to prepare": (
        lambda tmp_path: cli("tiny-stories"),
        "error: unknown dataset 'tiny-stories'; use shakespeare, c4, fineweb-edu or text:PATH"),
    "--val-tokens below one window": (
        lambda tmp_path: data.val_windows(np.zeros(1000, np.uint16), 256, 10),
        "error: --val-tokens 10 is fewer than one window of --seq-len 256 tokens"),
    "validation split below one window": (
        lambda tmp_path: data.val_windows(np.zeros(100, np.uint16), 256, 32768),
        "error: the validation split has 100 tokens, fewer than one window of --seq-len 256 needs (257); "
        "use a smaller --seq-len or a larger corpus"),
    "training split below one sequence": (  # 263 tokens: enough to prepare, 236 of them for training
        lambda tmp_path: data.load_tokens(prepared(tmp_path, "Tiny. " * 130), 256),
        "error: dataset 'text-corpus' has 236 training tokens, fewer than one sequence of --seq-len 256 needs "
        "(258); use a smaller --seq-len or a larger corpus"),
    "no readable text": (
        binary_corpus,
        "error: no readable text at '{tmp_path}/corpus': its 1 .txt file(s) are binary, not UTF-8 or not regular "
        "readable files"),
    "no C4 shard": (
        lambda tmp_path: c4_folder(tmp_path, validation=None),
        "error: no C4 validation shard (c4-validation.*-of-*.json.gz) in '{tmp_path}/c4'"),
    "a C4 shard that is not gzip": (
        c4_folder,
        "error: {tmp_path}/c4/c4-validation.00000-of-00008.json.gz is not a C4 shard (line 1: BadGzipFile: "
        "Not a gzipped file (b'no'))"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_one_line_errors(tmp_path, data_dir, case):
    trigger, expected = ERRORS[case]
    assert exit_message(trigger, tmp_path) == expected.format(tmp_path=tmp_path)


def test_text_corpus_skips_binary_non_utf8_and_non_regular_files(tmp_path, data_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a_good.txt").write_text("Plain text, ünïcödé too. " * 30)
    (corpus / "b_binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\0\0\0")
    (corpus / "c_latin1.txt").write_bytes("café".encode("latin-1"))
    os.mkfifo(corpus / "d_fifo.txt")  # reading it would block forever
    (corpus / "e_dangling.txt").symlink_to(tmp_path / "gone.txt")
    (corpus / "f_loop.txt").symlink_to(corpus / "f_loop.txt")
    cli(f"text:{corpus}")
    out, err = capsys.readouterr()
    assert f"skipped {corpus / 'b_binary.txt'}: binary (contains NUL bytes)" in err
    assert f"skipped {corpus / 'c_latin1.txt'}: not UTF-8 (byte 0xe9 at offset 3)" in err
    for name in ("d_fifo.txt", "e_dangling.txt", "f_loop.txt"):
        assert f"skipped {corpus / name}: not a regular file" in err
    assert out.splitlines()[-1] == "train with: python train_full.py --dataset text-corpus"
    tokens = data.load_tokens("text-corpus")
    ids = np.concatenate([tokens["train"], tokens["val"]]).tolist()
    assert data.get_tokenizer().decode(ids) == "Plain text, ünïcödé too. " * 30 + "<|endoftext|>"


# -----------------------------------------------------------------------------
# refused inputs write nothing

def short_file(tmp_path, text):
    (tmp_path / "short.txt").write_text(text)
    return f"text:{tmp_path / 'short.txt'}"


def fifo_only(tmp_path):
    (tmp_path / "pipes").mkdir()
    os.mkfifo(tmp_path / "pipes" / "a.txt")
    return f"text:{tmp_path / 'pipes'}"


SHORT = ", fewer than one sequence of the default --seq-len 256 needs (257): nothing written"
REFUSED = {  # argv of data.py -> its one-line error
    "zero-byte file": (lambda p: [short_file(p, "")], "error: {tmp_path}/short.txt gives 1 token" + SHORT),
    "whitespace file": (lambda p: [short_file(p, " \n\n\t  \n")], "error: {tmp_path}/short.txt gives 7 tokens" + SHORT),
    "capped below a sequence": (lambda p: [write_corpus(p / "corpus", 2), "--max-tokens", "100"],
                                "error: {tmp_path}/corpus gives 100 tokens (--max-tokens 100)" + SHORT),
    "empty folder": (lambda p: (p / "empty").mkdir() or [f"text:{p / 'empty'}"],
                     "error: no .txt file at '{tmp_path}/empty'"),
    "missing path": (lambda p: [f"text:{p / 'missing'}"], "error: no .txt file at '{tmp_path}/missing'"),
    "no path": (lambda p: ["text:"], "error: no .txt file at ''"),
    "only a FIFO": (lambda p: [fifo_only(p)], "error: no readable text at '{tmp_path}/pipes': its 1 .txt file(s) "
                                              "are binary, not UTF-8 or not regular readable files"),
    **{f"--max-tokens {v}": (lambda p, v=v: [write_corpus(p / "corpus", 2), f"--max-tokens={v}"],
                             f"error: argument --max-tokens: must be a whole number of tokens >= 1, got {v}")
       for v in ("0", "-5", "nan", "inf", "1.5")},
    "--max-tokens many": (lambda p: [write_corpus(p / "corpus", 2), "--max-tokens", "many"],
                          "error: argument --max-tokens: expected a number of tokens, got 'many'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_preparation_is_one_line_and_writes_nothing(tmp_path, data_dir, case):
    argv, expected = REFUSED[case]
    assert exit_message(cli, *argv(tmp_path)) == expected.format(tmp_path=tmp_path)
    assert not data_dir.exists() or set(os.listdir(data_dir)) <= {"tokenizer", "raw"}  # no dataset folder, no lock


def test_a_failed_preparation_hands_its_lock_to_a_waiter(tmp_path, data_dir):
    """The failed preparation removes its folder and lock file, holding the lock; a preparer that waited on that
    lock file takes a new one and prepares: the two never run at once, and the dataset is finished."""
    name = write_corpus(tmp_path / "corpus", 3)
    d = data_dir / "text-corpus"
    read, write = os.pipe()
    go = multiprocessing.get_context("fork").Event()

    def prepare_after_waiting():  # in a child forked before the lock is taken (else it would inherit it)
        sys.stdout = os.fdopen(write, "w")
        go.wait()
        data.prepare(name)

    waiter = multiprocessing.get_context("fork").Process(target=prepare_after_waiting)
    waiter.start()
    with pytest.raises(SystemExit):
        with data.locked(str(d)):
            go.set()
            with os.fdopen(read) as out:
                assert out.readline().startswith("waiting for another process that prepares")
            sys.exit("error: a refused input")
    waiter.join(60)
    assert waiter.exitcode == 0 and set(snapshot(d)) == set(FILES)


@pytest.mark.parametrize("name", ["../data/shakespeare", "shakespeare/../shakespeare", "..", "", "text:/tmp/x"])
def test_a_dataset_is_a_name_under_data_not_a_path(data_dir, name):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        data.dataset_name(name)
    if name.startswith("text:"):
        assert str(e.value) == ("'text:/tmp/x' is a corpus, not a dataset: prepare it (python data.py text:/tmp/x), "
                                "then train with --dataset text-x")
    else:
        assert str(e.value) == f"{name!r} is not a dataset name: a dataset is a folder under data/, named without / or .."
        assert exit_message(data.load_tokens, name) == f"error: {e.value}"
    assert data.dataset_name("text-corpus") == "text-corpus"


DAMAGED_META = {"cut short": '{"tokens": {"train": 9', "empty": "", "a list": "[1, 2]",
                "no tokens": '{"sha256": {}}', "a folder": None}


@pytest.mark.parametrize("damage", DAMAGED_META)
def test_a_damaged_meta_json_is_refused_and_shakespeare_prepared_again(tmp_path, data_dir, monkeypatch, damage):
    prepared(tmp_path, "A sentence of a corpus. " * 50)
    monkeypatch.setattr(data, "shakespeare_docs", lambda: iter(["To be, or not to be."] * 20))
    data.load_tokens("shakespeare")
    for d in (data_dir / "text-corpus", data_dir / "shakespeare"):
        (d / "meta.json").unlink()
        if DAMAGED_META[damage] is None:
            (d / "meta.json").mkdir()
        else:
            (d / "meta.json").write_text(DAMAGED_META[damage])
    why = {"a folder": "meta.json cannot be read: Is a directory", "a list": "meta.json holds no token count of "
           "each split", "no tokens": "meta.json holds no token count of each split"}.get(
        damage, "meta.json is not JSON: cut short, empty or overwritten")
    assert exit_message(data.load_tokens, "text-corpus") == (
        f"error: dataset 'text-corpus' is damaged ({why}); run: python data.py text:PATH, with PATH your .txt file "
        "or folder named 'corpus'")
    tokens = data.load_tokens("shakespeare")  # the default corpus is prepared again
    assert json.loads((data_dir / "shakespeare" / "meta.json").read_text())["tokens"]["train"] == len(tokens["train"])
