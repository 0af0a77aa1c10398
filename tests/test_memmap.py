"""Corpora encoded once into the cache and read through a memory map: the same ids, batches and losses as the
previous implementation (which read the text twice and wrote through a writable map), in random and stream
mode and under 2-process DDP; a bounded final evaluation says it is partial.

Expected values (`GOLDEN`) were recorded with the previous implementation on the corpus `build_corpus` writes:
tiny shakespeare twice, with a line of accents, a dash, CJK and "\\r\\n" after every 97th line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TINY, run_main

from charlm.data.corpus import IdWriter, embedded_corpus, encode_corpus, id_view
from charlm.data.datamodule import CharDataModule, RandomWindows, Streams, relabel

LINUX = Path("/proc/self/maps").exists()
GOLDEN = {  # unit: (vocab size, ids, sha of the ids, train length, {sampling: (sha of 4 batches, bigram loss)})
    "char": (71, 2_245_658, "6e91c41ee2ed15c2", 2_021_092,
             {"random": ("c1d74269abca868b", 4.690539836883545), "stream": ("8b54c4d4d7b88290", 4.6455912590026855)}),
    "byte": (80, 2_254_744, "39101db80fc9c36d", 2_029_269,
             {"random": ("f1a7195ccdea8a61", 4.915144205093384), "stream": ("6e86160b8f2b704f", 4.922450423240662)}),
}
GOLDEN_RANKS = {0: {"stream": "6d245b5d8cd2fe52", "random": "76a57eec89f2a148"},  # char unit, batch 4 a rank
                1: {"stream": "e0334d8b6f624585", "random": "07d80d0186e37564"}}


def build_corpus(path: Path) -> None:
    base = Path(embedded_corpus()).read_bytes()
    extra = "naïve café — 東京 ✓\r\n".encode()
    out = bytearray()
    for _ in range(2):
        for i, line in enumerate(base.split(b"\n")):
            out += line + (b"\n" if i % 97 else b"\n" + extra)
    path.write_bytes(bytes(out))


def sha(tensors) -> str:
    return hashlib.sha256(b"".join(t.long().numpy().tobytes() for t in tensors)).hexdigest()[:16]


def mapping(t: torch.Tensor) -> tuple[str, int] | None:
    """(file, inode) a tensor's memory is mapped from (Linux's /proc/self/maps), else None."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split(maxsplit=5)
        lo, hi = (int(a, 16) for a in parts[0].split("-"))
        if lo <= ptr < hi:
            return (parts[5].strip(), int(parts[4])) if len(parts) == 6 else None
    return None


def mapped_file(t: torch.Tensor) -> str | None:
    """The file a tensor's memory is mapped from, else None."""
    return (mapping(t) or (None, 0))[0]


def in_memory(ids: torch.Tensor) -> torch.Tensor:
    """A copy of `ids` in this process's memory (the path before memory maps)."""
    return torch.from_numpy(np.array(ids.numpy()))


def bigram_loss(batches, vocab_size: int) -> float:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(vocab_size, vocab_size)
    with torch.no_grad():
        return sum(float(F.cross_entropy(emb(b.x).flatten(0, 1), b.y.flatten())) for b in batches) / len(batches)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memmap")
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("CHARLM_CACHE", str(folder / "cache"))
        build_corpus(folder / "corpus.txt")
        yield folder / "corpus.txt"


@pytest.mark.parametrize("unit", ["char", "byte"])
def test_encoded_once_and_mapped_from_the_cache(corpus, unit):
    vocab, ids = encode_corpus(str(corpus), unit=unit)
    n_vocab, n, digest, _, _ = GOLDEN[unit]
    assert (len(vocab), len(ids), sha([ids])) == (n_vocab, n, digest)  # the previous implementation's ids
    assert ids.dtype == torch.uint8
    if LINUX:
        assert mapped_file(ids).endswith(".ids.npy") and Path(mapped_file(ids)).parent == corpus.parent / "cache"


@pytest.mark.parametrize("unit", ["char", "byte"])
@pytest.mark.parametrize("sampling", ["random", "stream"])
def test_mapped_batches_and_loss_equal_the_in_memory_path(corpus, unit, sampling):
    dm = CharDataModule(path=str(corpus), unit=unit, block_size=64, batch_size=8)
    dm.prepare()
    train = dm.splits["train"]
    assert len(train) == GOLDEN[unit][3]
    make = (lambda ids: RandomWindows(ids, 64, 8, 1337)) if sampling == "random" else (lambda ids: Streams(ids, 64, 8))
    runs = []
    for ids in (train, in_memory(train)):
        it = iter(make(ids))
        runs.append([next(it) for _ in range(4)])
    mapped, memory = runs
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.reset == b.reset for a, b in zip(mapped, memory))
    digest, loss = GOLDEN[unit][4][sampling]
    assert sha([b.x for b in mapped] + [b.y for b in mapped]) == digest
    assert bigram_loss(mapped, len(dm.vocab)) == bigram_loss(memory, len(dm.vocab))
    assert math.isclose(bigram_loss(mapped, len(dm.vocab)), loss, rel_tol=1e-6)


def test_more_symbols_widen_the_ids_as_they_stream_by(tmp_path):
    """Ids are written as the symbols come; past 256 and 32,768 symbols the file widens; at the end every id
    is its symbol's rank in the sorted vocabulary, whatever order the symbols came in."""
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0x61, 0x7B, 5000), rng.integers(0x4E00, 0x4E00 + 300, 5000),
              rng.permutation(np.arange(0x10000, 0x10000 + 40_000)), rng.integers(0x20, 0x7F, 100)]
    writer = IdWriter(tmp_path / "ids.npy", 0x110000)
    dtypes = []
    for c in chunks:
        writer.append(c.astype(np.uint32))
        dtypes.append(writer.dtype.name)
    symbols = writer.finish()
    points = np.concatenate(chunks)
    expected_symbols, expected_ids = np.unique(points, return_inverse=True)
    assert dtypes == ["uint8", "uint16", "uint32", "uint32"]
    assert symbols == expected_symbols.tolist()
    got = np.load(tmp_path / "ids.npy", mmap_mode="r")
    assert got.dtype == np.uint32 and np.array_equal(got, expected_ids)
    assert id_view(got).dtype == torch.int32 and id_view(got)[-100:].tolist() == expected_ids[-100:].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy"]  # no widening file left behind


def test_ids_of_more_than_256_chars_are_mapped_as_int16(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "hanzi.txt"
    f.write_text("".join(chr(0x4E00 + i) for i in range(300)) * 2000 + "\n", encoding="utf-8")
    vocab, ids = encode_corpus(str(f))
    assert ids.dtype == torch.int16 and ids[:3].tolist() == [1, 2, 3] and ids[-1] == 0  # "\n" sorts first
    if LINUX:
        assert mapped_file(ids).endswith(".ids.npy")  # a view of the uint16 cache file, not a widened copy


def test_another_vocabulary_is_mapped_into_a_file_not_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "cache"))
    ids = torch.tensor([0, 1, 2, 1, 0, 2], dtype=torch.uint8)
    out, dropped = relabel(ids, np.array([5, -1, 3]), np.dtype(np.uint8))  # id 1 unknown: dropped (unknown=skip)
    assert out.tolist() == [5, 3, 5, 3] and dropped == 2
    if LINUX:
        assert Path(mapped_file(out)).parent == tmp_path / "cache"  # an unnamed file in the cache folder


def _ddp_losses(batches, vocab_size: int) -> list[float]:
    """Two SGD steps of a bigram model under DistributedDataParallel (gradients averaged over the ranks)."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Embedding(vocab_size, vocab_size))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    losses = []
    for b in batches:
        loss = F.cross_entropy(model(b.x).flatten(0, 1), b.y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _ddp_rank(rank: int, port: int, corpus: str, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CHARLM_CACHE=cache)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dist.barrier()  # both ranks reach the empty cache at once
        result = {}
        for sampling in ("stream", "random"):
            dm = CharDataModule(path=corpus, block_size=64, batch_size=4, sampling=sampling, seed=1337)
            dm.prepare()
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0)  # what Lightning sets
            mapped = dm.splits["train"]
            it = iter(dm.train_dataloader())
            got = [next(it) for _ in range(3)]
            dm.splits["train"] = in_memory(mapped)
            it = iter(dm.train_dataloader())
            ref = [next(it) for _ in range(3)]
            result[sampling] = {"sha": sha([b.x for b in got]), "file": mapping(mapped) if LINUX else None,
                                "same": all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(got, ref)),
                                "losses": _ddp_losses(got, len(dm.vocab)), "ref": _ddp_losses(ref, len(dm.vocab))}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP on localhost; no flock")
def test_two_ddp_ranks_map_the_same_file_and_read_their_own_shards(corpus, tmp_path):
    """Both ranks start on an empty cache (as ranks started by torchrun or SLURM do): one encodes, the other
    waits for it and maps the same entry; each reads its own shard."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    mp.spawn(_ddp_rank, args=(port, str(corpus), str(cache), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(ranks):
        for sampling in ("stream", "random"):
            got = res[sampling]
            assert got["sha"] == GOLDEN_RANKS[r][sampling]  # rank r's own shard, as the previous implementation cut it
            assert got["same"] and got["losses"] == got["ref"]  # mapped == in memory, batches and DDP losses
    assert ranks[0]["stream"]["sha"] != ranks[1]["stream"]["sha"]
    if LINUX:
        files = {tuple(res[s]["file"]) for res in ranks for s in ("stream", "random")}
        assert len(files) == 1 and files.pop()[0].endswith(".ids.npy")  # both ranks map the one file (one inode)
    assert len(list(cache.glob("*.ids.npy"))) == 1 and not list(cache.glob(".*.npy"))  # encoded once, no leftovers


def test_a_bounded_final_evaluation_says_it_is_partial(tmp_path):
    """eval.final_max_chars=N: the end-of-run figure scores the first N val characters and says so (results.json,
    the printed lines); charlm.evaluate does the same, with the same figure; unbounded, it is whole."""
    run = tmp_path / "run"
    ran = run_main("charlm.train", *TINY, "eval.window_batches=0", "eval.final_max_chars=1000", f"hydra.run.dir={run}")
    res = json.loads((run / "results.json").read_text())
    total = 111_540 - 1  # tiny shakespeare's val split: every character but the first can be scored
    assert (res["partial"], res["scored_chars"], res["total_chars"]) == (True, 1000, total)
    assert res["protocol"]["chars_scored"] == 1000
    assert f"partial: scored the first 1,000 of {total:,} val characters" in ran.stdout
    assert "final evaluation (first 1,000 of 111,539 val chars)" in ran.stderr  # the progress bar's label

    out = tmp_path / "eval.json"
    ran = run_main("charlm.evaluate", f"ckpt_path={res['best_ckpt']}", "eval.chunk=512", "eval.window_batches=0",
                   "eval.final_max_chars=1000", f"json={out}")
    ev = json.loads(out.read_text())
    assert (ev["partial"], ev["scored_chars"], ev["total_chars"]) == (True, 1000, total)
    assert math.isclose(ev["loss"], res["best_val_loss"], rel_tol=1e-6)  # the same characters, the same figure
    assert "partial: scored the first 1,000 of 111,539 val characters" in ran.stdout
    assert "evaluate val" in ran.stderr  # the bar

    run_main("charlm.evaluate", f"ckpt_path={res['best_ckpt']}", "eval.window_batches=0", f"json={out}")
    whole = json.loads(out.read_text())
    assert (whole["partial"], whole["scored_chars"], whole["total_chars"]) == (False, total, total)


def test_the_wandb_summary_says_partial():
    from charlm.scoring.results import summarize_wandb

    class WandbLogger:  # what summarize_wandb looks for, with W&B's summary as a dict
        experiment = SimpleNamespace(summary={})

    results = {"best_val_loss": 1.5, "best_val_bpc": 2.16, "partial": True, "scored_chars": 1000, "total_chars": 9999}
    summarize_wandb(SimpleNamespace(loggers=[WandbLogger()]), results)
    assert WandbLogger.experiment.summary == results


@pytest.mark.slow  # three fresh processes importing torch: ~30 s on 2 cores; make test-all runs it
def test_bench_corpus_measures_an_encoding_run_and_a_cached_run(tmp_path):
    import subprocess

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench_corpus.py", "--mb", "2", "--train-steps", "2",
                           "--json", str(out)], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["encode"]["ids"] == 2_000_000 and res["encode"]["mb_per_s"] > 0
    for run in ("encode", "cached", "train"):
        assert 50 < res[run]["peak_rss_mb"] < 4000, run  # a real process's peak, in MB
    if LINUX:
        assert res["cached"]["ids_file"].endswith(".ids.npy")  # the cached run reads the map
    assert "bound for a 1 GB corpus: peak RSS under 1,200 MB" in proc.stdout
