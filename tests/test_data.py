"""Data pipeline: tokenizers, dsv3-prepare, the stdlib corpus, Megatron datasets, DP iterator."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from helpers.distributed import free_port
from megatron_dsv3.cli.prepare import main as prepare_main
from megatron_dsv3.run_config import DataSection
from megatron_dsv3.data import (
    ByteTokenizer,
    DataError,
    TokenizerError,
    build_datasets,
    build_train_iterator,
    ensure_default_dataset,
    load_tokenizer,
    micro_batch_indices,
    parse_blend,
    prepare,
)

SEQ = 32


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small default corpus (first 200 kB of the stdlib) and its cache dir."""
    cache = str(tmp_path_factory.mktemp("cache"))
    cfg = DataSection(cache_dir=cache, corpus_max_bytes=200_000)
    return cfg, ensure_default_dataset(cache, max_bytes=200_000)


def _letters(tmp_path, name, letter, docs=40, size=300):
    files = tmp_path / name
    files.mkdir()
    for i in range(docs):
        (files / f"{i:03d}.txt").write_text(letter * size)
    return str(prepare([str(files)], str(tmp_path / name / "data")).prefix)


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "MLA + DeepSeekMoE, Grüße, 深度求索 🚀"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eod_id, tok.pad_id]) == text
    assert (tok.eod, tok.pad, tok.vocab_size) == (256, 257, 258)


def test_hf_tokenizer_json_is_used_when_given(tmp_path):
    import tokenizers  # transformers' dependency (the test extra); optional for dsv3-train itself
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<pad>": 1, "<|endoftext|>": 2, "hello": 3, "world": 4}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(str(path))
    assert tok.encode("hello world") == [3, 4]
    assert (tok.eod, tok.pad, tok.vocab_size) == (2, 1, 5)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_prepare_text_dir_keeps_one_document_per_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = ["first doc", "second, longer document", "ünïcode"]
    for i, text in enumerate(texts):
        (docs / f"{i}.txt").write_text(text)
    stats = prepare([str(docs)], str(tmp_path / "out" / "d"))
    ds = IndexedDataset(stats.prefix)
    tok = ByteTokenizer()
    assert stats.num_documents == len(ds) == 3
    assert list(ds.document_indices) == [0, 1, 2, 3]
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + [tok.eod_id]
    assert ds[0].dtype == np.uint16
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p]


def test_prepare_cli_jsonl_one_document_per_line(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate("xyz")))
    rc = prepare_main(["--input", str(src), "--output-prefix", str(tmp_path / "j"),
                       "--json-key", "body", "--no-append-eod"])
    assert rc == 0 and "3 documents" in capsys.readouterr().out
    ds = IndexedDataset(str(tmp_path / "j"))
    assert [ds[i].tolist() for i in range(3)] == [[ord("x")], [ord("y")], [ord("z")]]


def test_prepare_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(DataError, match="input not found: .*nope"):
        prepare([str(tmp_path / "nope")], str(tmp_path / "o"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no key 'text'"):
        prepare([str(bad)], str(tmp_path / "o"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="input is empty"):
        prepare([str(empty)], str(tmp_path / "o"))
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="cannot read .*blob.txt"):
        prepare([str(binary)], str(tmp_path / "o"))
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())
    assert prepare_main(["--input", str(bad), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_prepare_cli_refuses_an_output_prefix_it_would_hide_or_cannot_write(tmp_path, capsys):
    src = tmp_path / "doc.txt"
    src.write_text("hello")
    (tmp_path / "out").mkdir()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "p.bin").mkdir()  # os.replace onto it fails, also for root
    suggestion = f"give a prefix of files, e.g. {tmp_path / 'out' / 'name'}"
    refusals = [
        (f"{tmp_path / 'out'}{os.sep}", ["would write the hidden files", suggestion]),
        (str(tmp_path / "out"), ["is an existing directory", suggestion]),
        (str(tmp_path / "a_file" / "sub" / "data"), [f"{tmp_path / 'a_file'} is a file, not a directory"]),
        (str(tmp_path / "p"), [f"cannot write {tmp_path / 'p'}.bin/.idx: Is a directory ({tmp_path / 'p.bin'})"]),
    ]
    for prefix, problems in refusals:
        capsys.readouterr()
        assert prepare_main(["--input", str(src), "--output-prefix", prefix]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("dsv3-prepare: error: ") and prefix in err, err
        assert all(problem in err for problem in problems), err
    assert os.listdir(tmp_path / "out") == []
    assert sorted(os.listdir(tmp_path)) == ["a_file", "doc.txt", "out", "p.bin"]  # no temporary files left


def test_default_corpus_is_built_once_then_reused(tmp_path):
    prefix = ensure_default_dataset(str(tmp_path), max_bytes=100_000)
    tok = ByteTokenizer()
    ds = IndexedDataset(prefix)
    assert len(ds) > 3 and ds[0][-1] == tok.eod_id
    first = ds[0].tolist()
    assert "import" in tok.decode(first + ds[1].tolist())
    del ds
    stamp = os.stat(prefix + ".bin").st_mtime_ns
    assert ensure_default_dataset(str(tmp_path), max_bytes=100_000) == prefix
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp
    os.remove(prefix + ".bin")  # a damaged file no longer matches the manifest
    with open(prefix + ".bin", "wb") as f:
        f.write(b"0123456789")
    ensure_default_dataset(str(tmp_path), max_bytes=100_000)
    rebuilt = IndexedDataset(prefix)
    assert rebuilt[0].tolist() == first


def test_interrupted_prepare_leaves_nothing_usable(tmp_path, monkeypatch):
    calls = []

    def failing_encode(self, text):
        calls.append(text)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return np.zeros(3, dtype=np.int64)

    monkeypatch.setattr(ByteTokenizer, "encode_np", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_dataset(str(tmp_path), max_bytes=100_000)
    corpus_dir = tmp_path / "corpus"
    assert os.listdir(corpus_dir) == []
    monkeypatch.undo()
    prefix = ensure_default_dataset(str(tmp_path), max_bytes=100_000)
    ds = IndexedDataset(prefix)
    assert ds[0].max() == 256


def test_samples_hold_seq_plus_one_tokens_with_shifted_labels(corpus):
    cfg, prefix = corpus
    train, valid = build_datasets(cfg, SEQ, 50, seed=3, vocab_size=320)
    assert valid is None and len(train) >= 50
    data = IndexedDataset(prefix)  # arrays it returns are views: keep it alive
    stream = np.concatenate([data[i] for i in range(len(data))])
    for i in (0, 7, 49):
        s = train[i]
        assert s["tokens"].shape == s["labels"].shape == (SEQ,)
        text = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()
        assert len(text) == SEQ + 1 and np.array_equal(text[1:], s["labels"].numpy())
        starts = np.flatnonzero(stream[:-SEQ] == text[0])  # one contiguous window of the data
        assert any(np.array_equal(stream[j:j + SEQ + 1], text) for j in starts)
    batch = next(build_train_iterator(cfg, SEQ, 4, 4, 0, 1, seed=3, vocab_size=320))
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (4, SEQ)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])


def test_weighted_blend_samples_sources_in_proportion(tmp_path):
    a = _letters(tmp_path, "a", "a")
    b = _letters(tmp_path, "b", "b")
    assert parse_blend([1, a, "3", b]) == ([a, b], [1.0, 3.0])
    cfg = DataSection(cache_dir=str(tmp_path / "cache"), paths=[1, a, 3, b])
    batch = next(build_train_iterator(cfg, 16, 800, 800, 0, 1, seed=5, vocab_size=320))
    from_a = (batch["tokens"] == ord("a")).any(dim=1).float().mean().item()
    from_b = (batch["tokens"] == ord("b")).any(dim=1).float().mean().item()
    assert abs(from_a - 0.25) < 0.03 and abs(from_b - 0.75) < 0.03
    with pytest.raises(DataError, match="mixes weights"):
        parse_blend([1, a, b])


def test_dp_slices_are_disjoint_and_cover_the_global_batch(corpus):
    cfg, _ = corpus
    mbs, gbs, dp = 2, 8, 2
    whole = _take(build_train_iterator(cfg, SEQ, gbs, gbs, 0, 1, 11, 320), 2)
    ranks = [_take(build_train_iterator(cfg, SEQ, mbs, gbs, r, dp, 11, 320), 4) for r in range(dp)]
    for step in range(2):
        parts = [b["tokens"] for r in range(dp) for b in ranks[r][2 * step:2 * step + 2]]
        assert torch.equal(torch.cat(parts), whole[step]["tokens"])
    index_sets = [
        {i for n in range(6) for i in micro_batch_indices(n, 0, gbs, mbs, r, dp)} for r in range(dp)
    ]
    assert not index_sets[0] & index_sets[1]
    assert index_sets[0] | index_sets[1] == set(range(3 * gbs))


def test_start_sample_resumes_where_the_run_stopped(corpus):
    cfg, _ = corpus
    args = (cfg, SEQ, 2, 8, 1, 2, 17, 320)
    uninterrupted = _take(build_train_iterator(*args), 6)
    resumed = _take(build_train_iterator(*args, start_sample=8), 4)
    for a, b in zip(uninterrupted[2:], resumed):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(uninterrupted[0]["tokens"], resumed[0]["tokens"])


def test_data_the_model_cannot_use_is_refused(corpus, tmp_path):
    cfg, prefix = corpus
    with pytest.raises(DataError, match=r"token id 256, but the model's vocab_size is 200"):
        build_datasets(cfg, SEQ, 10, 1, vocab_size=200)
    missing = str(tmp_path / "absent")
    with pytest.raises(DataError, match=r"absent\.idx is missing"):
        build_train_iterator(dataclasses.replace(cfg, paths=[missing]), SEQ, 1, 1, 0, 1, 1, 320)
    with pytest.raises(DataError, match=r"fewer than seq_length \+ 1"):
        build_datasets(cfg, 10_000_000, 10, 1, vocab_size=320)
    with pytest.raises(DataError, match="not a multiple"):
        build_train_iterator(cfg, SEQ, 3, 8, 0, 1, 1, 320)


def test_dali_backend_yields_the_megatron_batches(corpus):
    pytest.importorskip("nvidia.dali")
    cfg, _ = corpus
    args = (SEQ, 2, 8, 1, 2, 23, 320)
    ref = _take(build_train_iterator(cfg, *args, start_sample=8), 5)
    got = _take(build_train_iterator(dataclasses.replace(cfg, backend="dali"), *args, start_sample=8), 5)
    for a, b in zip(ref, got):
        assert b["tokens"].dtype == torch.long
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


def test_dali_backend_without_dali_says_how_to_install(corpus, monkeypatch):
    cfg, _ = corpus
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(DataError, match="pip install nvidia-dali-cuda120"):
        build_train_iterator(dataclasses.replace(cfg, backend="dali"), SEQ, 1, 1, 0, 1, 1, 320)


def _rank_batches(rank, port, cache, out):
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=__import__("datetime").timedelta(seconds=60),
    )
    cfg = DataSection(cache_dir=cache, corpus_max_bytes=150_000, paths=[])
    batches = _take(build_train_iterator(cfg, SEQ, 2, 4, rank, 2, 29, 320), 2)
    torch.save(batches, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_ranks_build_the_shared_cache_and_split_batches(tmp_path):
    port = free_port()
    cache = str(tmp_path / "cache")
    torch.multiprocessing.start_processes(
        _rank_batches, args=(port, cache, str(tmp_path)), nprocs=2, start_method="fork"
    )
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = _take(build_train_iterator(
        DataSection(cache_dir=cache, corpus_max_bytes=150_000), SEQ, 4, 4, 0, 1, 29, 320), 2)
    for step in range(2):
        assert torch.equal(torch.cat([got[0][step]["tokens"], got[1][step]["tokens"]]),
                           whole[step]["tokens"])
