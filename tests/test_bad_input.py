"""Every user mistake ends in one `error:` line naming the problem, a non-zero exit, no traceback,
and nothing already on disk overwritten.

Most cases call the CLI's own `main()` in this process (`run_main`: same argv, exit status and stderr, without
a fresh interpreter's import of torch); test_missing_corpus, test_pickle_with_code_is_refused_not_run and the
divergence test run the real `python -m` commands end to end."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, run_main


def assert_user_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout[-500:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


def train(tmp_path, *args):
    """`python -m charlm.train` in a fresh interpreter."""
    return run_cli("charlm.train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", *args, check=False)


def train_here(tmp_path, *args):
    """The same command through charlm.train.main() in this process."""
    return run_main("charlm.train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", *args, check=False)


def sample(*args):
    """`charlm.sample` through its main() in this process (test_pickle_with_code... runs the real command)."""
    return run_main("charlm.sample", *args, check=False)


# ---- corpus ------------------------------------------------------------------------------

def test_missing_corpus(tmp_path):
    assert_user_error(train(tmp_path, "data=text", f"data.path={tmp_path}/nope.txt"), "nope.txt", "no such file")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(train_here(tmp_path, "data=text", f"data.path={tmp_path}/empty.txt"), "empty.txt", "empty")


def test_corpus_shorter_than_a_window(tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be")
    assert_user_error(train_here(tmp_path, "data=text", f"data.path={tmp_path}/short.txt"), "short.txt", "block_size")


def test_folder_without_text_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG")
    assert_user_error(train_here(tmp_path, "data=text", f"data.path={tmp_path}/corpus"), "corpus", "no text files")


def test_binary_file(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 100)
    assert_user_error(train_here(tmp_path, "data=text", f"data.path={tmp_path}/blob.txt"), "blob.txt", "binary")


def test_non_utf8_is_an_error_or_replaced(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(("Ça coûte très cher, garçon. " * 400).encode("latin-1"))
    path = f"data.path={tmp_path}/latin1.txt"
    assert_user_error(train_here(tmp_path, "data=text", path), "latin1.txt", "UTF-8")
    ok = train(tmp_path, "data=text", path, "data.errors=replace")
    assert ok.returncode == 0, ok.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    ckpt = torch.load(results["best_ckpt"], map_location="cpu", weights_only=True)
    chars = ckpt["hyper_parameters"]["vocab"]["chars"]  # the trained model's vocabulary
    assert "\ufffd" in chars and results["vocab_size"] == len(chars)
    assert "Ç" not in chars and "ç" not in chars  # the latin-1 bytes were replaced, not guessed


def test_chinese_corpus_with_thousands_of_characters(tmp_path):
    import random

    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(3000)]
    text = "".join(rng.choice(chars) + ("。\n" if rng.random() < 0.05 else "") for _ in range(30_000))
    (tmp_path / "zh.txt").write_text(text, encoding="utf-8")
    ok = train(tmp_path, "data=text", f"data.path={tmp_path}/zh.txt")
    assert ok.returncode == 0, ok.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["vocab_size"] > 2900
    prompt = chars[0] + chars[1]
    ckpt = results["best_ckpt"]
    out = run_cli("charlm.sample", f"ckpt_path={ckpt}", f"prompt={prompt}", "n_chars=10", "seed=1").stdout
    assert out.startswith(chars[0] + chars[1]) and len(out.strip()) >= 10


# ---- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["model=nope"], ["model/nope", "lstm"]),
    (["model.hiden_dim=3"], ["model.hiden_dim"]),
    (["+model.hiden_dim=3"], ["model.hiden_dim"]),
    (["data.block_size=0"], ["data.block_size"]),
    (["model.dropout=1.0"], ["model.dropout"]),
    (["data.batch_size=many"], ["data.batch_size"]),
    (["data.unit=bits"], ["data.unit=bits", "char, byte"]),
    (["data.block_size=200000"], ["val split", "block_size"]),
])
def test_bad_config(tmp_path, args, fragments):
    assert_user_error(train_here(tmp_path, *args), *fragments)


def folder_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`, recursively (hidden ones such as `.hydra/` included): path -> (sha256,
    mtime), so that a file rewritten with the same content counts as written too."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_run_is_not_overwritten(trained_run, tmp_path):
    before = folder_digest(trained_run)
    assert "checkpoints/best.ckpt" in before and ".hydra/config.yaml" in before
    proc = run_main("charlm.train", *TINY, f"hydra.run.dir={trained_run}", check=False)
    assert_user_error(proc, "already holds a run", "ckpt_path=")
    assert folder_digest(trained_run) == before  # nothing written, changed, added or removed


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    assert_user_error(train(tmp_path, "optim.lr=1e30"), "diverged at step")
    good = tmp_path / "good"
    run_cli("charlm.train", *TINY, "stop_at_step=6", f"hydra.run.dir={good}")
    last = good / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    # resume with a divergence threshold that any loss trips: the run must stop and leave last.ckpt alone
    proc = run_cli("charlm.train", *TINY, f"ckpt_path={last}", "divergence_factor=0.001",
                   f"hydra.run.dir={good}", check=False)
    assert_user_error(proc, "diverged at step 6")
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before


# ---- checkpoints -------------------------------------------------------------------------

def test_bad_checkpoints(tmp_path, trained_run):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("hello")
    good = (trained_run / "checkpoints" / "best.ckpt").read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(good[: len(good) // 2])
    for name, fragment in [("missing.ckpt", "no such"), ("empty.ckpt", "empty"),
                           ("text.ckpt", "not a loadable"), ("trunc.ckpt", "not a loadable")]:
        assert_user_error(sample(f"ckpt_path={tmp_path / name}"), name, fragment)
    proc = run_main("charlm.train", *TINY, f"ckpt_path={tmp_path / 'trunc.ckpt'}", f"hydra.run.dir={tmp_path}/r",
                    check=False)
    assert_user_error(proc, "trunc.ckpt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": {"vocab": _Payload(str(marker))}}, tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert_user_error(run_cli("charlm.sample", f"ckpt_path={tmp_path / 'evil.ckpt'}", check=False), "evil.ckpt",
                      "refused")  # the real command, end to end
    assert not marker.exists()
    assert pickle  # the payload above is what a plain torch.load/pickle.load would execute


def test_resume_on_corpus_with_other_characters(tmp_path, trained_run):
    (tmp_path / "zh.txt").write_text("数据" * 5000, encoding="utf-8")
    proc = train_here(tmp_path, "data=text", f"data.path={tmp_path}/zh.txt",
                      f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}")
    assert_user_error(proc, "zh.txt", "not in the vocabulary")


# ---- sampling ----------------------------------------------------------------------------

def test_bad_sampling_arguments(trained_run):
    ckpt = f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}"
    assert_user_error(sample(ckpt, "prompt=Olá€"), "not in the vocabulary", "€")
    for arg, key in [("top_p=0", "top_p"), ("top_p=1.5", "top_p"), ("top_k=0", "top_k"), ("n_chars=-1", "n_chars")]:
        assert_user_error(sample(ckpt, arg), key)
    skipped = sample(ckpt, "prompt=Ol€a", "unknown=skip", "n_chars=5", "seed=1")
    assert skipped.returncode == 0 and skipped.stdout.startswith("Ola")
    greedy = [sample(ckpt, "temperature=0", "n_chars=30", f"seed={s}").stdout for s in (1, 2)]
    assert greedy[0] == greedy[1] and len(greedy[0].strip()) > 0  # temperature <= 0 is declared greedy
