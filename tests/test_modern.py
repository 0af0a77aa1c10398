"""The modern recurrent models (minGRU, minLSTM, Hawk, Mamba) and the scans under them.

Scans are checked against the plain loop over time in float64; models against themselves cut into
chunks and stepped one character at a time, and their layers and gates against the papers'
equations written out here as loops.
"""

from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils._pytree import tree_flatten, tree_map

from charlm.models import native
from charlm.models.contract import capabilities
from charlm.models.hawk import HawkLM
from charlm.models.layers import CausalConv
from charlm.models.mamba import MambaLM
from charlm.models.mingru import MinGRULM
from charlm.models.minlstm import MinLSTMLM
from charlm.models.rnn import RNNLM
from charlm.models.scan import g, linear_scan, log_g, log_scan, sequential_scan

ROOT = Path(__file__).resolve().parents[1]
V = 11
ATOL = {"atol": 1e-5, "rtol": 1e-5}
TIGHT = {"atol": 1e-12, "rtol": 1e-10}
CLASSES = {"mingru": MinGRULM, "minlstm": MinLSTMLM, "hawk": HawkLM, "mamba": MambaLM}
NAMES = list(CLASSES)


def tiny(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    opts = {
        "mingru": {"mlp_mult": 2},
        "minlstm": {"expansion": 1.5, "mlp_mult": 0},  # a cell wider than the model, with its out projection
        "hawk": {"mlp_mult": 2},
        "mamba": {"state_dim": 4},
    }[name]
    return CLASSES[name](V, **{"hidden_dim": 16, "num_layers": 2, **opts, **kw}).eval()


def seq(B: int = 2, T: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the scans ------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 5, 16, 17, 40, 130])
@pytest.mark.parametrize("with_h0", [False, True])
def test_log_scan_equals_loop(T, with_h0):
    gen = torch.Generator().manual_seed(T)
    log_a = -F.softplus(torch.randn(3, T, 4, generator=gen, dtype=torch.float64))   # a in (0, 1)
    log_b = torch.randn(3, T, 4, generator=gen, dtype=torch.float64)
    h0 = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.1 if with_h0 else None
    expected = sequential_scan(log_a.exp(), log_b.exp(), h0)
    for method in ("heinsen", "chunked"):  # T=130: several chunks of 64, or of 12, and a partial one
        got = log_scan(log_a, log_b, None if h0 is None else h0.log(), method=method).exp()
        torch.testing.assert_close(got, expected, **TIGHT)


# T=70 takes the same paths as 37 (several chunks and a ragged last one) at twice the cost: slow
@pytest.mark.parametrize("T", [1, 7, 37, pytest.param(70, marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("method", ["heinsen", "chunked"])
def test_log_scan_gradients_equal_the_loops(T, with_h0, method):
    gen = torch.Generator().manual_seed(T)
    inputs = [-F.softplus(torch.randn(2, T, 3, generator=gen, dtype=torch.float64)),
              torch.randn(2, T, 3, generator=gen, dtype=torch.float64)]
    if with_h0:
        inputs.append(torch.randn(2, 3, generator=gen, dtype=torch.float64))
    w = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)

    def loop(la, lb, lh0=None):
        return sequential_scan(la.exp(), lb.exp(), None if lh0 is None else lh0.exp()).log()

    grads = []
    for fn in (lambda *x: log_scan(*x[:2], *x[2:], method=method), loop):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        (fn(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **TIGHT)
    leaves = tuple(t.clone().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(lambda *x: log_scan(*x[:2], *x[2:], method=method), leaves)


@pytest.fixture(params=["compiled", "pytorch"])
def kernels(request, monkeypatch):
    """Run a test once with the compiled CPU scans (charlm.models.native) and once with the PyTorch ones."""
    if request.param == "compiled" and not native.available(torch.float64):
        pytest.skip("no C compiler here: the compiled scans are not built")
    monkeypatch.setenv("CHARLM_NATIVE", "1" if request.param == "compiled" else "0")
    return request.param


@pytest.mark.parametrize("T", [1, 2, 3, 16, 17, 50, 257])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("rest", [(4,), (3, 2)])
def test_linear_scan_equals_loop(T, with_h0, rest, kernels):
    gen = torch.Generator().manual_seed(T)
    a = torch.rand(2, T, *rest, generator=gen, dtype=torch.float64)
    a[:, ::3] = 1.0  # a = 1 is allowed: a pure accumulator
    b = torch.randn(2, T, *rest, generator=gen, dtype=torch.float64)   # of both signs
    h0 = torch.randn(2, *rest, generator=gen, dtype=torch.float64) if with_h0 else None
    torch.testing.assert_close(linear_scan(a.log(), b, h0), sequential_scan(a, b, h0), **TIGHT)


@pytest.mark.parametrize("T", [1, 7, 37])
def test_linear_scan_gradients_equal_the_loops(T, kernels):
    gen = torch.Generator().manual_seed(0)
    log_a = (torch.rand(2, T, 3, generator=gen, dtype=torch.float64) * 0.9 + 0.05).log()
    b = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (lambda la, b, h: linear_scan(la, b, h), lambda la, b, h: sequential_scan(la.exp(), b, h)):
        inputs = [t.clone().requires_grad_(True) for t in (log_a, b, h0)]
        (fn(*inputs) * w).sum().backward()
        grads.append([t.grad for t in inputs])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **TIGHT)
    inputs = tuple(t.clone().requires_grad_(True) for t in (log_a, b, h0))
    assert torch.autograd.gradcheck(linear_scan, inputs)


@pytest.mark.parametrize("T, block, rows", [(1, 64, 8), (7, 3, 2), (37, 8, 3), (70, 64, 8)])
def test_selective_scan_and_its_gradients_equal_the_loop(T, block, rows, kernels):
    """Mamba's fused scan (its (B, T, E, N) tensors rebuilt tile by tile in backward, or in C) against
    the recurrence written out: a = exp(dt A), b = dt u B, the loop, y = h . C; cut across batch rows
    and time blocks, the last of each short (the compiled form splits the 5 rows over the threads)."""
    from charlm.models.selective import selective_scan

    gen = torch.Generator().manual_seed(T)
    B, E, N = 5, 3, 2
    dt = torch.rand(B, T, E, generator=gen, dtype=torch.float64) * 0.5
    A = -torch.rand(E, N, generator=gen, dtype=torch.float64) * 2
    Bt, Ct = (torch.randn(B, T, N, generator=gen, dtype=torch.float64) for _ in range(2))
    u = torch.randn(B, T, E, generator=gen, dtype=torch.float64)
    h0 = torch.randn(B, E, N, generator=gen, dtype=torch.float64)
    w_y, w_h = torch.randn(B, T, E, generator=gen, dtype=torch.float64), torch.randn(B, E, N, generator=gen,
                                                                                     dtype=torch.float64)

    def loop(dt, A, Bt, Ct, u, h0):
        h, ys = h0, []
        for t in range(T):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bt[:, t, None, :]
            ys.append((h * Ct[:, t, None, :]).sum(-1))  # (B, E)
        return torch.stack(ys, 1), h

    results = []
    for fn in (lambda *x: selective_scan(*x, block=block, rows=rows), loop):
        inputs = [t.clone().requires_grad_(True) for t in (dt, A, Bt, Ct, u, h0)]
        y, h = fn(*inputs)
        ((y * w_y).sum() + (h * w_h).sum()).backward()
        results.append([y, h, *(t.grad for t in inputs)])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **TIGHT)


@pytest.mark.parametrize("loop_from", [1, 10**9])  # every step one by one (big steps), or the chunks
def test_chunked_scan_both_ways_equals_the_loop(monkeypatch, loop_from):
    from charlm.models import scan

    monkeypatch.setattr(scan, "LOOP_MIN_ELEMENTS", loop_from)
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 23, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 23, 3, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(scan.chunked_scan(a, b, h0), sequential_scan(a, b, h0), **TIGHT)
    backwards = sequential_scan(a.flip(1), b.flip(1), h0).flip(1)  # h_t = a_t h_{t+1} + b_t from the end
    torch.testing.assert_close(scan.chunked_scan(a, b, h0, reverse=True), backwards, **TIGHT)
    log_h = scan.chunked_scan(a.log(), b.abs().log(), h0.abs().log(), log_space=True)
    torch.testing.assert_close(log_h.exp(), sequential_scan(a, b.abs(), h0.abs()), **TIGHT)
    out = b.clone()  # in place, into b itself
    torch.testing.assert_close(scan.chunked_scan(a, out, h0, out=out), sequential_scan(a, b, h0), **TIGHT)


def test_float32_scans_survive_strong_decay():
    """a_t ~ 1e-6 next to a_t ~ 1 over 2000 steps: finite in float32 and close to the float64 loop."""
    gen = torch.Generator().manual_seed(0)
    T = 2000
    strong = torch.rand(2, T, 8, generator=gen) < 0.5
    a = torch.where(strong, 1e-6, 1 - 1e-4 * torch.rand(2, T, 8, generator=gen)).double()
    b = torch.randn(2, T, 8, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    expected = sequential_scan(a, b, h0)
    log_a = a.log().float().requires_grad_(True)
    got = linear_scan(log_a, b.float(), h0.float())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    got.sum().backward()
    assert torch.isfinite(log_a.grad).all()
    # the log-space scans, positive b
    expected = sequential_scan(a, b.exp(), None)
    for method, rtol in (("heinsen", 1e-3), ("chunked", 1e-4)):  # heinsen: A_t over 64 steps of log 1e-6
        log_a = a.log().float().requires_grad_(True)
        got = log_scan(log_a, b.float(), None, method=method).exp()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=rtol)
        got.sum().backward()
        assert torch.isfinite(log_a.grad).all()


def test_g_is_the_papers_activation():
    x = torch.tensor([-30.0, -2.0, 0.0, 2.0, 40.0], dtype=torch.float64)
    expected = torch.tensor([1 / (1 + math.exp(30)), 1 / (1 + math.exp(2)), 0.5, 2.5, 40.5], dtype=torch.float64)
    torch.testing.assert_close(g(x), expected, **TIGHT)
    torch.testing.assert_close(log_g(x), expected.log(), **TIGHT)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_causal_conv_is_a_padded_depthwise_conv_in_any_chunks(width):
    torch.manual_seed(0)
    conv = CausalConv(5, width)
    x = torch.randn(2, 9, 5)
    padded = F.pad(x.transpose(1, 2), (width - 1, 0))                                     # (B, E, width-1+T)
    expected = F.conv1d(padded, conv.weight.unsqueeze(1), conv.bias, groups=5).transpose(1, 2)  # (B, T, E)
    whole, _ = conv(x, None)
    torch.testing.assert_close(whole, expected, **ATOL)
    outs, window = [], None
    for piece in x.split([1, 2, 1, 5], 1):
        y, window = conv(piece, window)
        outs.append(y)
    assert torch.equal(torch.cat(outs, 1), whole)


# ---- the models -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cuts", [(1,), (2,), (3,), (1, 2, 3), (5, 6, 11), (1, 4, 9, 30), (65, 66, 131)])
def test_chunked_equals_whole(name, cuts):
    model = tiny(name)
    idx = seq(T=141)  # past the scans' chunk sizes and Mamba's 64-step blocks, odd
    whole, whole_state = model(idx)
    outs, state, start = [], None, 0
    for end in (*cuts, idx.shape[1]):
        logits, state = model(idx[:, start:end], state)
        outs.append(logits)
        start = end
    torch.testing.assert_close(torch.cat(outs, 1), whole, **ATOL)
    torch.testing.assert_close(state, whole_state, **ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_step_by_step_equals_parallel(name):
    model = tiny(name)
    idx = seq(T=20)
    whole, _ = model(idx)
    outs, state = [], None
    for t in range(idx.shape[1]):
        logits, state = model(idx[:, t : t + 1], state)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), whole, **ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_causal(name):
    model = tiny(name)
    idx = seq(T=20)
    t = 8
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], **ATOL)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("name", NAMES)
def test_state_is_tensors_that_detach_and_continue(name):
    model = tiny(name).train()
    idx = seq(T=12)
    _, state = model(idx[:, :5])
    leaves, _ = tree_flatten(state)
    assert leaves and all(isinstance(x, torch.Tensor) for x in leaves)
    for x in leaves:  # not a view into the (B, T, ...) activations, which a checkpoint would save whole
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    detached = tree_map(lambda x: x.detach(), state)
    later, _ = model(idx[:, 5:], detached)
    torch.testing.assert_close(later, model(idx)[0][:, 5:], **ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_the_embedding_from_far_back(name):
    model = tiny(name).train()
    idx = seq(T=30)
    leaves = []

    def swap(module, inputs, out):  # the embedding output as a leaf, to read d logits / d e_s
        leaves.append(out.detach().requires_grad_(True))
        return leaves[-1]

    handle = model.embed.register_forward_hook(swap)
    try:
        logits, _ = model(idx)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum() + logits[:, -1, 0].sum(), leaves[0])
    assert torch.isfinite(grad).all()
    assert (grad[:, 0].norm(dim=-1) > 0).all()  # the first character reaches the last prediction
    logits, _ = model(idx)
    F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad[idx.unique()].abs().sum() > 0


def expected_retain_layer0(model, idx: torch.Tensor) -> torch.Tensor:
    """The mean memory gate of layer 0, from the papers' formulas (not the models' code paths)."""
    block = model.blocks[0]
    x = model.embed(idx)                                                       # (B, T, D)
    if isinstance(model, (MinGRULM, MinLSTMLM)):
        k = block.cell.proj(block.norm1(x))
        if type(model) is MinGRULM:  # (MinLSTMLM is a MinGRULM with another cell)
            z = torch.sigmoid(k[..., : k.shape[-1] // 2])
            return (1 - z).mean()
        f, i, _ = torch.sigmoid(k).chunk(3, -1)
        return (f / (f + i)).mean()
    if isinstance(model, HawkLM):
        rec = block.rec
        u = rec.inp(block.norm1(x)).transpose(1, 2)                            # (B, W, T)
        u = F.conv1d(F.pad(u, (3, 0)), rec.conv.weight.unsqueeze(1), rec.conv.bias, groups=u.shape[1])
        r = torch.sigmoid(rec.lru.gate_a(u.transpose(1, 2)))
        return (torch.sigmoid(rec.lru.a_param) ** (8 * r)).mean()
    ssm = block.mixer
    u = ssm.in_proj(block.norm(x))[..., : ssm.D.shape[0]].transpose(1, 2)      # (B, E, T)
    u = F.conv1d(F.pad(u, (3, 0)), ssm.conv.weight.unsqueeze(1), ssm.conv.bias, groups=u.shape[1])
    u = F.silu(u.transpose(1, 2))
    dt = F.softplus(ssm.dt_proj(ssm.x_proj(u)[..., : ssm.dt_rank]))           # (B, T, E)
    A = -torch.exp(ssm.A_log)
    return torch.exp(dt[..., None] * A).mean()


def paper_layer(model, x: torch.Tensor) -> torch.Tensor:
    """Layer 0's recurrent part on x (B, T, D) from the paper's equations, by a loop over time."""
    block = model.blocks[0]
    steps = range(x.shape[1])
    if isinstance(model, (MinGRULM, MinLSTMLM)):
        cell = block.cell
        parts = cell.proj(x).chunk(cell.n_gates + 1, -1)
        h, out = 0.0, []
        for t in steps:
            if type(model) is MinGRULM:
                z = torch.sigmoid(parts[0][:, t])
                h = (1 - z) * h + z * g(parts[1][:, t])
            else:
                f, i = torch.sigmoid(parts[0][:, t]), torch.sigmoid(parts[1][:, t])
                h = f / (f + i) * h + i / (f + i) * g(parts[2][:, t])
            out.append(h)
        return torch.stack(out, 1)
    if isinstance(model, HawkLM):
        lru = block.rec.lru
        h, out = 0.0, []
        for t in steps:
            r, i = torch.sigmoid(lru.gate_a(x[:, t])), torch.sigmoid(lru.gate_x(x[:, t]))
            a = torch.sigmoid(lru.a_param) ** (8 * r)
            h = a * h + torch.sqrt(1 - a**2) * (i * x[:, t])
            out.append(h)
        return torch.stack(out, 1)
    ssm = block.mixer
    E = ssm.D.shape[0]
    u, z = ssm.in_proj(x).split(E, -1)                                          # (B, T, E)
    u = F.conv1d(F.pad(u.transpose(1, 2), (3, 0)), ssm.conv.weight.unsqueeze(1), ssm.conv.bias, groups=E)
    u = F.silu(u.transpose(1, 2))                                               # (B, T, E)
    dt, Bt, Ct = ssm.x_proj(u).split([ssm.dt_rank, ssm.state_dim, ssm.state_dim], -1)
    dt = F.softplus(ssm.dt_proj(dt))                                            # (B, T, E)
    A = -torch.exp(ssm.A_log)                                                   # (E, N)
    h, out = 0.0, []
    for t in steps:
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bt[:, t, None, :] * u[:, t, :, None]
        out.append((h * Ct[:, t, None, :]).sum(-1) + ssm.D * u[:, t])          # (B, E)
    return ssm.out_proj(torch.stack(out, 1) * F.silu(z))                        # (B, T, D)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [23, 150])  # 150: past Mamba's 64-step SSM blocks
def test_layer_follows_the_papers_equations(name, T):
    model = tiny(name).double()
    block = model.blocks[0]
    width = block.rec.lru.gate_a.in_features if isinstance(model, HawkLM) else 16
    x = torch.randn(2, T, width, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if isinstance(model, (MinGRULM, MinLSTMLM)):
            got = block.cell(x, None, None)[0]
        elif isinstance(model, HawkLM):
            got = block.rec.lru(x, None, None)
        else:
            got = block.mixer(x, None, None)[0]
        torch.testing.assert_close(got, paper_layer(model, x), **TIGHT)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_cpu_gates_are_the_log_space_gates(name):
    """The CPU path takes (keep, in) directly, the GPU path their logs: the two must be the same gates,
    also where the gate saturates (|logit| up to 30)."""
    cell = tiny(name).double().blocks[0].cell
    x = 30 * torch.randn(2, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        keep, inp = cell.gates(x)
        log_keep, log_in = cell.log_gates(x)
    torch.testing.assert_close(keep, log_keep.exp(), **TIGHT)
    torch.testing.assert_close(inp, log_in.exp(), **TIGHT)
    assert ((keep >= 0) & (keep <= 1)).all() and (inp >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_gate_openings(name):
    model = tiny(name, num_layers=3).train()
    model.blocks[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    idx = seq(T=15)
    gates = model.gate_openings(idx)
    assert [m.training for m in model.modules()] == modes
    assert set(gates) == {"layer0/retain", "layer1/retain", "layer2/retain"}
    for value in gates.values():
        assert value.dim() == 0 and 0 <= float(value) <= 1
    with torch.no_grad():
        torch.testing.assert_close(gates["layer0/retain"], expected_retain_layer0(model, idx), **ATOL)
    model.eval()
    model.gate_openings(idx)
    assert not any(m.training for m in model.modules())
    assert capabilities(model).gate_openings is not None


def test_inits_are_the_papers():
    hawk = tiny("hawk")
    a_c = torch.sigmoid(hawk.blocks[0].rec.lru.a_param) ** 8
    assert (a_c >= 0.9 - 1e-6).all() and (a_c <= 0.999 + 1e-6).all() and a_c.std() > 0.01
    mamba = tiny("mamba")
    ssm = mamba.blocks[0].mixer
    dt = F.softplus(ssm.dt_proj.bias)
    assert (dt >= 1e-3 * (1 - 1e-4)).all() and (dt <= 0.1 * (1 + 1e-4)).all()
    torch.testing.assert_close(-torch.exp(ssm.A_log[0]), -torch.arange(1.0, 5.0))  # S4D-real: A_n = -(n+1)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    model = tiny(name)
    caps = capabilities(model)
    assert caps.preferred_sampling == "stream" and caps.evaluation == "streams"
    assert caps.token_embedding is model.embed
    assert caps.gpu_precision == "32-true"
    for p in list(inspect.signature(CLASSES[name]).parameters.values()):
        hint = typing.get_type_hints(CLASSES[name].__init__)[p.name]
        assert hint in (int, float, bool, str) or typing.get_origin(hint) is typing.Literal, (p.name, hint)


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("mingru", {"hidden_dim": 0}, "model.hidden_dim=0"),
        ("minlstm", {"num_layers": -1}, "model.num_layers=-1"),
        ("mingru", {"mlp_mult": -1}, "model.mlp_mult=-1"),
        ("hawk", {"dropout": 1.0}, "model.dropout=1.0"),
        ("hawk", {"conv_width": 0}, "model.conv_width=0"),
        ("mamba", {"dt_rank": -2}, "model.dt_rank=-2"),
        ("mamba", {"state_dim": 0}, "model.state_dim=0"),
    ],
)
def test_impossible_values_name_the_key(name, kwargs, key):
    with pytest.raises(ValueError, match=key):
        CLASSES[name](V, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_lists_every_argument_and_is_sized_like_the_lstm(name):
    from hydra.utils import instantiate

    path = ROOT / "conf" / "model" / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.load(path)
    params = set(inspect.signature(CLASSES[name]).parameters) - {"vocab_size"}
    assert set(cfg) - {"_target_"} == params
    model = instantiate(cfg, vocab_size=65)
    assert isinstance(model, CLASSES[name])
    lstm = sum(p.numel() for p in RNNLM(65).parameters())
    n = sum(p.numel() for p in model.parameters())
    assert 0.9 * lstm < n < 1.1 * lstm, (n, lstm)
