import gzip
import json
import os

import numpy as np
import pytest
import torch

import data
from model import IGNORE, SIZES, Llama


def test_tokenizer_is_gpt2():
    enc = data.get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    # ids of GPT-2's BPE, as tiktoken.get_encoding("gpt2") gives them
    assert enc.encode("Hello world!") == [15496, 995, 0]
    assert enc.encode("To be, or not to be: that is the question.") == [
        2514, 307, 11, 393, 407, 284, 307, 25, 326, 318, 262, 1808, 13]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "  Leading spaces, numbers 12345 and ünïcödé 👋\n\nnew paragraph"
    assert enc.decode(enc.encode(text)) == text


def test_byte_tokenizer_round_trips_and_prepares_its_own_dataset(tmp_path, monkeypatch):
    enc = data.ByteTokenizer()
    text = "To be, or not to be\nünïcödé 👋"
    assert enc.encode_ordinary("Hi!") == [72, 105, 33] and enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.decode(enc.encode_ordinary(text) + [enc.eot_token]) == text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text * 100)
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    data.prepare(f"text:{corpus}", tokenizer="bytes")
    tokens = data.load_tokens("text-corpus.txt-bytes")  # a folder of its own: the GPT-2 dataset is another one
    assert data.dataset_tokenizer("text-corpus.txt-bytes") == ("bytes", 257)
    assert bytes(np.concatenate([tokens["train"], tokens["val"]])[:-1].tolist()).decode() == text * 100
    assert data.prepare_command("shakespeare-bytes") == "python data.py shakespeare --tokenizer bytes"
    assert data.prepare_command("text-corpus.txt-bytes").startswith("python data.py text:PATH --tokenizer bytes,")


def test_write_tokens_round_trip(tmp_path):
    enc = data.get_tokenizer()
    docs = ["First document.", "Second one, a little longer.", "Third"]
    path = tmp_path / "x.bin"
    n = data.write_tokens(iter(docs), str(path), enc)
    ids = np.fromfile(path, dtype=np.uint16)
    assert len(ids) == n
    assert enc.decode(ids.tolist()) == "<|endoftext|>".join(docs) + "<|endoftext|>"
    assert data.write_tokens(iter(docs), str(path), enc, max_tokens=5) == 5


@pytest.mark.parametrize("expected_docs", [12, 24], ids=["as-expected", "shorter-than-expected"])
def test_without_max_tokens_the_bar_estimates_its_total_from_the_share_of_documents_read(tmp_path, monkeypatch,
                                                                                        expected_docs):
    bars = []

    class Recorded(data.tqdm):  # the bar's total at each update: what its ETA is computed from
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.totals = []
            bars.append(self)

        def update(self, n=1):
            self.totals.append(self.total)
            return super().update(n)
    monkeypatch.setattr(data, "tqdm", Recorded)
    monkeypatch.setattr(data, "BATCH_DOCS", 4)
    docs = ["abcdefghi"] * 8 + ["xy"] * 4  # batches of 4 documents: 40, 40 and 12 bytes with their end-of-text ids
    n = data.write_tokens(iter(docs), str(tmp_path / "x.bin"), data.TOKENIZERS["bytes"](), expected_docs=expected_docs)
    share = expected_docs / 12  # the estimate: tokens so far x expected documents / documents so far
    assert n == 92 and bars[0].totals == [round(120 * share), round(120 * share), round(92 * share)]
    assert bars[0].total == 92  # it ends where the corpus did


def test_prepare_text_folder(tmp_path, monkeypatch):
    data.get_tokenizer()  # cached before the data dir moves
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(f"document number {i} " * 50)
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    data.prepare(f"text:{corpus}")
    tokens = data.load_tokens(f"text:{corpus}")
    total = len(tokens["train"]) + len(tokens["val"])
    assert len(tokens["train"]) == int(0.9 * total)
    enc = data.get_tokenizer()
    assert enc.decode(tokens["val"][-3:].tolist()).endswith("4 <|endoftext|>")


def test_prepare_hub_dataset_with_a_local_stand_in(tmp_path, monkeypatch):
    data.get_tokenizer()
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path))
    streams = {"train": [f"train doc {i}." for i in range(100)], "validation": ["val doc one.", "val doc two."]}
    monkeypatch.setattr(data, "hub_docs", lambda name, split: iter(streams[split]))
    data.prepare("c4", max_tokens=40, val_tokens=1000)
    tokens = data.load_tokens("c4")
    enc = data.get_tokenizer()
    assert len(tokens["train"]) == 40
    assert enc.decode(tokens["train"][:5].tolist()) == "train doc 0.<|endoftext|>"
    assert enc.decode(tokens["val"].tolist()) == "val doc one.<|endoftext|>val doc two.<|endoftext|>"


def write_c4_shards(folder, split, shards):
    """C4's layout: c4-<split>.0000k-of-0000n.json.gz, one JSON object with a "text" (and more) per line."""
    folder.mkdir(exist_ok=True)
    for k, docs in enumerate(shards):
        with gzip.open(folder / f"c4-{split}.{k:05d}-of-{len(shards):05d}.json.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z", "url": "u"}) + "\n"
                         for doc in docs)


def test_c4_from_local_shards_is_the_same_with_2_workers_as_with_1(tmp_path, monkeypatch):
    shards = [[f"shard {k} document {i} \u00fc" * (1 + i % 3) for i in range(20)] for k in range(3)]
    write_c4_shards(tmp_path / "c4", "train", shards[::-1])  # shard order is the names', not the writing's
    write_c4_shards(tmp_path / "c4", "validation", [["val one", "val two"]])
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(data, "BATCH_DOCS", 3)  # 20 batches, so that the 2 workers take turns on them
    files = {}
    for workers in (2, 1):
        data.prepare("c4", max_tokens=2000, val_tokens=10, tokenizer="bytes", c4_dir=str(tmp_path / "c4"),
                     workers=workers)
        files[workers] = [(tmp_path / "data" / "c4-bytes" / f).read_bytes() for f in ("train.bin", "val.bin")]
    assert files[2] == files[1]
    expected = np.concatenate([list(doc.encode()) + [256] for docs in shards[::-1] for doc in docs])[:2000]
    assert np.array_equal(np.frombuffer(files[1][0], np.uint16), expected)
    assert np.frombuffer(files[1][1], np.uint16).tolist() == list(b"val one") + [256, *b"va"]


def test_a_hub_corpus_validates_on_the_documents_holding_the_papers_scored_tokens(tmp_path, monkeypatch):
    # scored tokens of documents as sequences of 256 (Documents.targets): 255 (cut), 10, 5, 7, 4, 30
    docs = ["a" * 300, "b" * 10, "c" * 5, "d" * 7, "e" * 4, "f" * 30]
    monkeypatch.setattr(data, "BATCH_DOCS", 2)  # the count carries over from batch to batch
    monkeypatch.setattr(data, "VAL_TARGETS", 268)
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(data, "hub_docs", lambda name, split: iter(docs if split == "validation" else ["train"] * 9))
    data.prepare("c4", tokenizer="bytes")
    val = data.load_tokens("c4-bytes")["val"]
    assert len(val) == 301 + 11 + 6  # the first three documents: 255 + 10 + 5 = 270 >= 268 > 265
    assert data.Documents(val, data.END_OF_TEXT["bytes"], "val").targets(256).sum() == 270
    data.prepare("c4", val_tokens=20, tokenizer="bytes")  # a count of tokens instead
    assert len(data.load_tokens("c4-bytes")["val"]) == 20


def train_t5_stand_in(path):
    """A tokenizer.json built as T5's (Unigram, Metaspace, a post-processor that appends </s> = id 1), trained here
    with the same library: the real file comes from a 20 MB download."""
    tokenizers = pytest.importorskip("tokenizers", reason="the t5 tokenizer's optional dependency")
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                                                 unk_token="<unk>")
    tok.train_from_iterator(["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind"] * 50,
                            trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.parent.mkdir(parents=True)
    tok.save(str(path))
    return tok


def test_t5_ids_are_the_tokenizer_files_with_its_end_of_sequence_after_each_document(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    tok = train_t5_stand_in(tmp_path / "data" / "tokenizer" / "t5-tokenizer.json")
    monkeypatch.setattr(data, "T5_JSON_SHA256", data.sha256_file(tmp_path / "data" / "tokenizer" / "t5-tokenizer.json"))
    docs = [" ".join([text] * 30) for text in ("To be, or not to be.", "that is the question", "Whether nobler in it")]
    (tmp_path / "corpus").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "corpus" / f"{i}.txt").write_text(doc)
    data.prepare(f"text:{tmp_path / 'corpus'}", tokenizer="t5")
    tokens = data.load_tokens("text-corpus-t5")
    ids = np.concatenate([tokens["train"], tokens["val"]]).tolist()
    assert ids == [i for doc in docs for i in tok.encode(doc).ids]  # the post-processor's </s> ends each document
    assert ids.count(1) == 3 and ids[-1] == 1
    assert data.T5Tokenizer().decode(ids) == " ".join(docs)  # </s> is special: decoding drops it
    assert data.dataset_tokenizer("text-corpus-t5") == ("t5", 32000)  # the papers': T5's ids without its 100 sentinels

    monkeypatch.setattr(data.T5Tokenizer, "n_vocab", 10)  # as if the text held a sentinel
    with pytest.raises(SystemExit) as e:
        data.prepare(f"text:{tmp_path / 'corpus'}", tokenizer="t5")
    assert str(e.value).startswith("error: a document of text:")
    assert str(e.value).endswith(f"maps to id {max(ids)}, outside the 10 ids of the t5 vocabulary: nothing written")
    assert data.load_tokens("text-corpus-t5")["val"].tolist() == tokens["val"].tolist()  # the dataset stays
    monkeypatch.setattr(data, "T5_JSON_SHA256", "0" * 64)
    with pytest.raises(SystemExit) as e:
        data.T5Tokenizer()
    assert str(e.value).endswith("t5-tokenizer.json does not match its pinned sha256; delete it and retry")


@pytest.mark.skipif(not os.path.exists(os.path.join(data.DATA_DIR, "tokenizer", "t5-tokenizer.json")),
                    reason="T5's tokenizer.json is fetched by `python data.py NAME --tokenizer t5` (a 20 MB download)")
def test_t5_ids_of_the_real_file_are_t5_bases():
    pytest.importorskip("tokenizers", reason="the t5 tokenizer's optional dependency")
    enc = data.T5Tokenizer()
    assert enc.encode_ordinary("Hello world") == [8774, 296]  # the ids of HF's t5-base tokenizer, then </s> = 1
    assert enc.encode_ordinary("The quick brown fox jumps over the lazy dog.") == [
        37, 1704, 4216, 3, 20400, 4418, 7, 147, 8, 19743, 1782, 5]
    assert enc.tokenizer.encode("Hello world").ids == [8774, 296, enc.eot_token]  # the file's post-processor
    assert enc.tokenizer.get_vocab_size() == 32100 and enc.tokenizer.token_to_id("<extra_id_99>") == enc.n_vocab


def test_missing_dataset_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        data.load_tokens("c4")
    assert str(e.value) == "error: dataset 'c4' is not prepared; run: python data.py c4"


def test_shakespeare_corpus(shakespeare):
    # 42 works, 1,565,959 GPT-2 tokens plus one <|endoftext|> after each, split 90/10
    assert len(shakespeare["train"]) + len(shakespeare["val"]) == 1_565_959 + 42
    assert len(shakespeare["val"]) == 156_601


def test_get_batch_targets_are_shifted_and_seeded(shakespeare):
    x, y = data.get_batch(shakespeare["train"], 4, 32, seed=7)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.get_batch(shakespeare["train"], 4, 32, seed=7)
    x3, _ = data.get_batch(shakespeare["train"], 4, 32, seed=8)
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_validation_set_is_fixed_and_contiguous(shakespeare):
    x, y = data.val_windows(shakespeare["val"], 64, 1000)
    assert x.shape == (15, 64)  # 1000 tokens -> 15 whole windows of 64 targets
    flat = torch.from_numpy(np.asarray(shakespeare["val"][:15 * 64 + 1]).astype(np.int64))
    assert torch.equal(x.flatten(), flat[:-1]) and torch.equal(y.flatten(), flat[1:])


def test_evaluate_is_the_token_mean_over_the_whole_set(shakespeare):
    torch.manual_seed(0)
    m = Llama(SIZES["nano"])
    x, y = data.val_windows(shakespeare["val"], 32, 7 * 32)
    y = y.clone()  # a view of the same tokens as x
    y[0, 10:] = y[5, 1:] = IGNORE  # pads, as documents mode's: not scored
    # reference: one forward over all 7 windows, summed scored token losses / their count
    logits, _ = m(x)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (y >= 0).sum()
    for B in (2, 3, 7):  # uneven last batches must not change the mean
        record = data.evaluate(m, (x, y), B, "cpu", torch.autocast("cpu", enabled=False))
        assert record["val_loss"] == pytest.approx(ref.item(), rel=1e-6)
        assert record["val_ppl"] == pytest.approx(np.exp(ref.item()), rel=1e-6)
        assert record["val_tokens"] == 7 * 32 - 22 - 31  # the pads are not counted
    # the official code's: the mean loss of each batch (3, 3 and 1 windows), summed, over the batches + 1
    means = [torch.nn.functional.cross_entropy(logits[i:i + 3].flatten(0, 1), y[i:i + 3].flatten()) for i in (0, 3, 6)]
    official = data.evaluate(m, (x, y), 3, "cpu", torch.autocast("cpu", enabled=False))["val_ppl_official_style"]
    assert official == pytest.approx(np.exp(sum(means).item() / 4), rel=1e-6)


def test_documents_are_the_papers_sequences():
    """Each document one sequence: its first seq_len - 1 text ids and the end-of-text id, padded, pads IGNOREd."""
    E, P = 256, IGNORE
    tokens = np.array([1, 2, 3, E, E, 4, 5, 6, 7, 8, 9, E, 10, 11], dtype=np.uint16)  # an empty one; a cut-off tail
    docs = data.Documents(tokens, E, "train")
    assert len(docs) == 3 and docs.targets(5).tolist() == [3, 4, 2]
    x, y = docs.sequences([0, 1, 2], 5)
    assert x.tolist() == [[1, 2, 3, E, E], [4, 5, 6, 7, E], [10, 11, E, E, E]]
    assert y.tolist() == [[2, 3, E, P, P], [5, 6, 7, E, P], [11, E, P, P, P]]
    # a step's documents do not depend on how it is split into micro-batches; each one once an epoch
    one = data.get_batch(docs, 6, 5, seed=3 * 10**9)[0]
    two = torch.cat([data.get_batch(docs, 3, 5, seed=3 * 10**9 + k)[0] for k in (0, 1)])
    assert torch.equal(one, two) and sorted(one[:3, 0].tolist()) == sorted(one[3:, 0].tolist()) == [1, 4, 10]
    assert not torch.equal(one, data.get_batch(docs, 6, 5, seed=4 * 10**9)[0])  # another run seed, another order
    # validation: the first documents up to n scored tokens
    assert data.val_documents(docs, 5, 7)[0].tolist() == x[:2].tolist()
