"""The compiled CPU scans (charlm/models/kernels.c through charlm.models.native): the same numbers as the
PyTorch scans in every model that uses them, split over threads, and a clean fallback when no build."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from charlm.models import native
from charlm.models.hawk import HawkLM
from charlm.models.mamba import MambaLM
from charlm.models.mingru import MinGRULM
from charlm.models.minlstm import MinLSTMLM

pytestmark = pytest.mark.skipif(not (native.available(torch.float32) and native.available(torch.float64)),
                                reason="no C compiler here: the compiled scans are not built")

MODELS = {
    "mamba": lambda: MambaLM(11, hidden_dim=16, num_layers=2, state_dim=4),
    "hawk": lambda: HawkLM(11, hidden_dim=16, num_layers=2, mlp_mult=2),
    "mingru": lambda: MinGRULM(11, hidden_dim=16, num_layers=2, mlp_mult=2),
    "minlstm": lambda: MinLSTMLM(11, hidden_dim=16, num_layers=2, mlp_mult=0),
}


@pytest.fixture
def threads():
    """Three threads for the test (more than this machine's cores is allowed): the kernels split the
    batch rows over them, and Mamba's backward sums one A-gradient per thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad()
    logits, _ = model(x, None)                                                   # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", list(MODELS))
def test_models_train_to_the_same_numbers_with_and_without_the_kernels(name, monkeypatch, threads):
    """float64: loss and every parameter's gradient agree to 1e-10 between the C and the PyTorch scans,
    and the C ones were the ones called."""
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y = torch.randint(11, (5, 70)), torch.randint(11, (5, 70))          # 70: past Mamba's 64-step blocks
    calls = []
    for fn in ("selective_forward", "selective_backward", "linear_forward", "linear_backward", "conv_forward",
               "conv_backward"):
        real = getattr(native, fn)
        monkeypatch.setattr(native, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))
    compiled = loss_and_grads(model, x, y)
    assert {c.split("_")[1] for c in calls} == {"forward", "backward"}
    if name in ("mamba", "hawk"):  # their causal convolution too
        assert {"conv_forward", "conv_backward"} <= set(calls)
    monkeypatch.setenv("CHARLM_NATIVE", "0")
    calls.clear()
    pytorch = loss_and_grads(model, x, y)
    assert calls == []
    assert len(compiled) == len(pytorch) > 5
    for got, expected in zip(compiled, pytorch):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_float32_selective_scan_matches_the_pytorch_form_at_mambas_size(monkeypatch, threads):
    """Mamba's own sizes in float32 (inner width 256, state 8): outputs and gradients within float32's
    rounding of the tiled PyTorch scan."""
    from charlm.models.selective import selective_scan

    gen = torch.Generator().manual_seed(0)
    B, T, E, N = 4, 64, 256, 8
    dt = torch.rand(B, T, E, generator=gen) * 0.1
    A = -torch.rand(E, N, generator=gen) * 8
    Bt, Ct = torch.randn(B, T, N, generator=gen), torch.randn(B, T, N, generator=gen)
    u = torch.randn(B, T, E, generator=gen)
    w = torch.randn(B, T, E, generator=gen)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CHARLM_NATIVE", flag)
        inputs = [t.clone().requires_grad_(True) for t in (dt, A, Bt, Ct, u)]
        y, h = selective_scan(*inputs)
        ((y * w).sum() + h.sum()).backward()
        results.append([y, h, *(t.grad for t in inputs)])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("T", "width"), [(9, 4), (2, 4), (1, 4), (7, 1), (5, 2)])
def test_causal_conv_and_its_gradients_match_the_pytorch_form(T, width, monkeypatch, threads):
    """float64, a carried window, T shorter and longer than the window, width 1: the output, the next
    window and the gradients of the input, the window, the weight and the bias agree."""
    from charlm.models.layers import CausalConv

    torch.manual_seed(T)
    conv = CausalConv(6, width).double()
    x, window = torch.randn(5, T, 6, dtype=torch.float64), torch.randn(5, width - 1, 6, dtype=torch.float64)
    w, w_next = torch.randn(5, T, 6, dtype=torch.float64), torch.randn(5, width - 1, 6, dtype=torch.float64)
    results, calls = [], []
    real = native.conv_backward
    monkeypatch.setattr(native, "conv_backward", lambda *a: calls.append(1) or real(*a))
    for flag in ("1", "0"):
        monkeypatch.setenv("CHARLM_NATIVE", flag)
        conv.zero_grad()
        inputs = [t.clone().requires_grad_(True) for t in (x, window)]
        y, nxt = conv(*inputs)
        ((y * w).sum() + (nxt * w_next).sum()).backward()
        results.append([y, nxt, *(t.grad for t in inputs), conv.weight.grad.clone(), conv.bias.grad.clone()])
    assert calls == [1]
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    # the window's own definition: the last width-1 inputs of (window, x)
    torch.testing.assert_close(results[0][1], torch.cat([window, x], 1)[:, T:].detach(), atol=0, rtol=0)


def test_a_failed_build_falls_back_to_the_pytorch_scans_with_one_line(tmp_path):
    """A compiler that fails: one line on stderr naming what failed, no traceback, nothing left in the
    kernels folder, and the model still trains (on the PyTorch scans)."""
    code = (
        "import torch; from charlm.models import native; from charlm.models.mamba import MambaLM\n"
        "assert not native.available()\n"
        "m = MambaLM(11, hidden_dim=8, num_layers=1, state_dim=2)\n"
        "logits, _ = m(torch.randint(11, (2, 9)), None); logits.sum().backward(); print('trained')\n"
    )
    folder = tmp_path / "kernels"
    env = {"PATH": "/usr/bin:/bin", "CC": "false", "CHARLM_KERNELS_DIR": str(folder), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "trained"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not be built" in lines[0], done.stderr
    assert "PyTorch scans and convolution" in lines[0], done.stderr
    assert list(folder.iterdir()) == []


def test_charlm_native_0_turns_the_kernels_off(monkeypatch):
    t = torch.zeros(2, 3)
    assert native.supports(t)
    assert not native.supports(t.to(torch.bfloat16))
    monkeypatch.setenv("CHARLM_NATIVE", "0")
    assert not native.supports(t)
