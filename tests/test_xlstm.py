"""xLSTM (sLSTM, mLSTM, the mixed stack) against the paper's equations written out here as float64 loops
without the stabiliser, at ordinary and at extreme (+-50) gate pre-activations; the chunkwise mLSTM against
its recurrence, gradients included; streaming against the whole sequence; training past a unigram model.
The model contract (no leak from the future, chunked == whole) is tests/test_contract.py's, for every YAML."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_SIZES
from omegaconf import OmegaConf

from charlm.models.contract import build_model, capabilities
from charlm.models.mlstm import mlstm_chunkwise
from charlm.models.rnn import RNNLM
from charlm.models.slstm import slstm_scan
from charlm.models.xlstm import MLSTMLM, SLSTMLM, XLSTMLM, block_pattern
from charlm.studies.gradflow import model_config

V = 11
TIGHT = {"atol": 1e-10, "rtol": 1e-9}
CLASSES = {"mlstm": MLSTMLM, "slstm": SLSTMLM, "xlstm": XLSTMLM}


def tiny(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    opts = {"xlstm": {"pattern": "msm"}}.get(name, {"num_layers": 2})
    return CLASSES[name](V, **{"hidden_dim": 16, "num_heads": 2, **opts, **kw}).eval()


def rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- the paper's equations, unstabilised, step by step -------------------------------------------------


def paper_slstm(wx, R, c=None, n=None, h=None):
    """c_t = f c + i z, n_t = f n + i, h_t = o c / n with i = exp(ĩ), f = sigmoid(f̃), z = tanh(z̃),
    o = sigmoid(õ), g̃ = W x + R h_{t-1}: wx (B, T, 4, NH, d) = W x + b, R (NH, d, 4 d). -> h (B, T, NH, d)."""
    B, T, _, NH, d = wx.shape
    zeros = wx.new_zeros(B, NH, d)
    c, n, h = (zeros if s is None else s for s in (c, n, h))
    out = []
    for t in range(T):
        raw = wx[:, t] + torch.einsum("bnh,nhg->bng", h, R).view(B, NH, 4, d).transpose(1, 2)  # (B, 4, NH, d)
        i, f, z, o = raw[:, 0].exp(), raw[:, 1].sigmoid(), raw[:, 2].tanh(), raw[:, 3].sigmoid()
        c, n = f * c + i * z, f * n + i
        h = o * c / n
        out.append(h)
    return torch.stack(out, 1), (c, n)


def paper_mlstm(q, k, v, i_pre, f_pre, C=None, n=None):
    """C_t = f C + i v k^T, n_t = f n + i k, h_t = C q / max(|n . q|, 1) per head; q, k, v (B, NH, T, d)."""
    B, NH, T, d = q.shape
    C = q.new_zeros(B, NH, d, d) if C is None else C
    n = q.new_zeros(B, NH, d) if n is None else n
    out = []
    for t in range(T):
        i, f = i_pre[:, :, t, None].exp(), f_pre[:, :, t, None].sigmoid()
        C = f[..., None] * C + i[..., None] * v[:, :, t, :, None] * k[:, :, t, None, :]
        n = f * n + i * k[:, :, t]
        qt = q[:, :, t]
        out.append(torch.einsum("bhvk,bhk->bhv", C, qt) / (n * qt).sum(-1, keepdim=True).abs().clamp_min(1))
    return torch.stack(out, 2), (C, n)


def mlstm_inputs(T, gate_scale=1.0, seed=0):
    q, k, v = (rand(2, 3, T, 4, seed=seed + j) for j in range(3))
    i_pre, f_pre = rand(2, 3, T, seed=seed + 3, scale=gate_scale), rand(2, 3, T, seed=seed + 4, scale=gate_scale)
    return q, k / 2, v, i_pre, f_pre


@pytest.mark.parametrize("gate_scale", [1.0, 50.0])
def test_slstm_is_the_papers_recurrence(gate_scale):
    """The stabilised scan gives the paper's h from an empty and from a carried state; at +-50 the gates'
    exp(50) ~ 5e21 is fine in float64, and the float32 scan stays finite and close."""
    wx = rand(2, 9, 4, 2, 3)
    wx[:, :, :2] = gate_scale * torch.sign(wx[:, :, :2])                    # ĩ, f̃ at +-scale
    R = rand(2, 3, 12, seed=1, scale=0.3)
    expected, (c, n) = paper_slstm(wx, R)
    h, state = slstm_scan(wx, R, None)
    torch.testing.assert_close(h, expected, **TIGHT)
    torch.testing.assert_close(state[0] * state[2].exp(), c, rtol=1e-9, atol=0)  # c' = c exp(-m)
    torch.testing.assert_close(state[1] * state[2].exp(), n, rtol=1e-9, atol=0)
    assert (state[1] >= 1 - 1e-12).all()                                    # n' >= 1: never divides by ~0
    more = rand(2, 5, 4, 2, 3, seed=2)
    h2, _ = slstm_scan(more, R, state)
    torch.testing.assert_close(h2, paper_slstm(more, R, c, n, expected[:, -1])[0], **TIGHT)
    h32, s32 = slstm_scan(wx.float(), R.float(), None)
    assert all(torch.isfinite(x).all() for x in (h32, *s32[:2]))
    torch.testing.assert_close(h32.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("T", [1, 7, 20])
def test_mlstm_chunkwise_equals_the_recurrence_gradients_included(chunk, T):
    q, k, v, i_pre, f_pre = mlstm_inputs(T)
    C0, n0, m0 = rand(2, 3, 4, 4, seed=7), rand(2, 3, 4, seed=8), rand(2, 3, seed=9)
    w = rand(2, 3, T, 4, seed=10)
    grads = []
    for fn in ("chunkwise", "paper"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, i_pre, f_pre, C0, n0)]
        q_, k_, v_, i_, f_, C_, n_ = leaves
        if fn == "chunkwise":  # the carried state is stabilised: C' = C exp(-m)
            h, (C, n, m) = mlstm_chunkwise(q_, k_, v_, i_, F.logsigmoid(f_), (C_, n_, m0), chunk)
            C, n = C * m.exp()[..., None, None], n * m.exp()[..., None]
        else:
            h, (C, n) = paper_mlstm(q_, k_, v_, i_, f_, C_ * m0.exp()[..., None, None], n_ * m0.exp()[..., None])
        ((h * w).sum() + C.sum() + n.sum()).backward()
        grads.append([h.detach(), C.detach(), n.detach(), *(x.grad for x in leaves)])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **TIGHT)


def test_mlstm_stabiliser_at_extreme_gates():
    """ĩ, f̃ at +-50: exp(50) would overflow a float32 memory within a few writes; the stabilised float32
    form stays finite, gradients too, and agrees with the float64 paper loop."""
    q, k, v, i_pre, f_pre = mlstm_inputs(40, seed=3)
    random_signs = (50 * torch.sign(i_pre), 50 * torch.sign(f_pre))
    writes_then_whispers = (torch.tensor([50.0] * 16 + [-50.0] * 24).expand_as(i_pre), torch.full_like(f_pre, 50))
    for i_pre, f_pre in (random_signs, writes_then_whispers):  # the second: the carried m rules the next chunk
        expected, _ = paper_mlstm(q, k, v, i_pre, f_pre)
        leaves = [x.float().requires_grad_(True) for x in (q, k, v, i_pre, f_pre)]
        h, (C, n, m) = mlstm_chunkwise(*leaves[:4], F.logsigmoid(leaves[4]), None, 16)
        h.sum().backward()
        assert all(torch.isfinite(x).all() for x in (h, C, n, m, *(x.grad for x in leaves)))
        torch.testing.assert_close(h.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CLASSES))
def test_models_survive_extreme_gate_biases(name):
    model = tiny(name).train()
    with torch.no_grad():
        for mod in model.modules():
            for gate in ("igate", "fgate", "w_if"):
                if hasattr(mod, gate):
                    getattr(mod, gate).bias.copy_(50 * torch.sign(torch.randn_like(getattr(mod, gate).bias)))
    idx = torch.randint(0, V, (2, 70))
    logits, state = model(idx)
    F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_slstm_gradients_equal_the_paper_loops():
    """The hand-written backward against autograd through the paper's loop: wx, R and a carried c, n, h."""
    wx, R = rand(2, 6, 4, 2, 3, seed=4), rand(2, 3, 12, seed=5, scale=0.5)
    c0, n0, h0, m0 = rand(2, 2, 3, seed=6), rand(2, 2, 3, seed=7).abs() + 0.5, rand(2, 2, 3, seed=8), rand(2, 2, 3)
    w = rand(2, 6, 2, 3, seed=9)
    grads = []
    for fn in ("scan", "paper"):
        leaves = [x.clone().requires_grad_(True) for x in (wx, R, c0, n0, h0)]
        if fn == "scan":
            h, _ = slstm_scan(leaves[0], leaves[1], (leaves[2], leaves[3], m0, leaves[4]))
        else:
            h, _ = paper_slstm(leaves[0], leaves[1], leaves[2] * m0.exp(), leaves[3] * m0.exp(), leaves[4])
        (h * w).sum().backward()
        grads.append([x.grad for x in leaves])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **TIGHT)
    inputs = tuple(x.clone().requires_grad_(True) for x in (wx, R, c0, n0, h0))
    assert torch.autograd.gradcheck(lambda a, b, c, n, h: slstm_scan(a, b, (c, n, m0, h))[0], inputs)


# ---- the models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("cuts", [(1,), (1, 2, 3), (5, 6, 11), (65, 66, 131)])
def test_streaming_equals_whole(name, cuts):
    model = tiny(name, chunk_size=8) if name != "slstm" else tiny(name)
    idx = torch.randint(0, V, (2, 141), generator=torch.Generator().manual_seed(1))
    whole, whole_state = model(idx)
    outs, state, start = [], None, 0
    for end in (*cuts, idx.shape[1]):
        logits, state = model(idx[:, start:end], state)
        outs.append(logits)
        start = end
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, whole_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CLASSES))
def test_gradients_through_a_carried_state_equal_the_whole_sequence(name):
    model = tiny(name).double()
    idx = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(2))
    grads = []
    for cut in (None, 13):
        model.zero_grad()
        if cut is None:
            logits, _ = model(idx)
        else:
            a, s = model(idx[:, :cut])
            logits = torch.cat([a, model(idx[:, cut:], s)[0]], 1)
        logits.logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **TIGHT)


@pytest.mark.parametrize("name", list(CLASSES))
def test_gate_trace_is_log_space_gates_in_the_unit_interval(name):
    model = tiny(name)
    hook = capabilities(model).gate_trace
    idx = torch.randint(0, V, (2, 12))
    whole, state = hook(idx)
    a, s = hook(idx[:, :5])
    b, _ = hook(idx[:, 5:], s)
    layers = len(model.blocks)
    assert set(whole) == {f"layer{i}/{g}" for i in range(layers) for g in ("forget", "input")}
    for key, g in whole.items():
        assert g.shape == (2, 12) and 0 <= float(g.min()) and float(g.max()) <= 1
        torch.testing.assert_close(torch.cat([a[key], b[key]], 1), g, atol=1e-5, rtol=1e-5)
        if key.endswith("input"):  # the first write from an empty state sets m_1 = ĩ_1: i'_1 = 1
            torch.testing.assert_close(g[:, 0], torch.ones(2))
    torch.testing.assert_close(state, model(idx)[1])
    if name == "mlstm":  # f_t = sigmoid(f̃_t) of layer 0, by hand: the gate reads (q, k, v) of the block's input
        layer = model.blocks[0].layer
        x = model.blocks[0].norm(model.embed(idx))
        xm = layer.up(x)[..., : layer.skip.numel()]                             # (B, T, E)
        xc = F.conv1d(F.pad(xm.transpose(1, 2), (3, 0)), layer.conv.weight.unsqueeze(1), layer.conv.bias,
                      groups=xm.shape[-1])
        xc = F.silu(xc.transpose(1, 2))
        f = torch.sigmoid(layer.fgate(torch.cat([layer.q(xc), layer.k(xc), layer.v(xm)], -1)))  # (B, T, NH)
        torch.testing.assert_close(whole["layer0/forget"], f.mean(-1), atol=1e-6, rtol=1e-5)


def test_block_pattern_is_the_papers_ratio():
    assert block_pattern("1:1", 4) == "msms" and block_pattern("3:1", 4) == "mmms"
    assert block_pattern("7:1", 8) == "mmmmmmms" and block_pattern("2:1", 6) == "mmsmms"
    assert block_pattern("1:0", 3) == "mmm" and block_pattern("0:1", 2) == "ss"
    assert tiny("xlstm", pattern="sm").pattern == "sm"
    assert XLSTMLM(V, hidden_dim=8, num_layers=8, ratio="7:1").pattern == "mmmmmmms"


@pytest.mark.parametrize("kwargs, key", [
    ({"ratio": "1"}, "model.ratio='1'"), ({"ratio": 7}, "model.ratio='7'"), ({"ratio": "0:0"}, "model.ratio='0:0'"),
    ({"ratio": "a:b"}, "model.ratio"),
    ({"pattern": "mxs"}, "model.pattern='mxs'"), ({"num_heads": 3}, "model.num_heads=3"),
    ({"hidden_dim": 0}, "model.hidden_dim=0"), ({"conv_width": 0}, "model.conv_width=0"),
    ({"dropout": 1.0}, "model.dropout=1.0"),
])
def test_impossible_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace("'", ".")):
        XLSTMLM(V, **{"hidden_dim": 16, "num_heads": 2, **kwargs})


@pytest.mark.parametrize("name", list(CLASSES))
def test_yaml_lists_every_argument_and_is_sized_like_the_lstm(name):
    from hydra.utils import instantiate

    path = ROOT / "conf" / "model" / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.load(path)
    assert set(cfg) - {"_target_"} == set(inspect.signature(CLASSES[name]).parameters) - {"vocab_size"}
    model = instantiate(cfg, vocab_size=65)
    assert type(model) is CLASSES[name]
    lstm = sum(p.numel() for p in RNNLM(65).parameters())
    assert 0.9 * lstm < sum(p.numel() for p in model.parameters()) < 1.1 * lstm
    caps = capabilities(model)
    assert caps.preferred_sampling == "stream" and caps.evaluation == "streams" and caps.token_embedding is model.embed
    assert not caps.decays("embed.weight", model.embed.weight) and caps.decays("blocks.0.norm.weight", torch.ones(2, 2))


@pytest.mark.parametrize("name", ["slstm", "mlstm", "xlstm", "xlstm:pattern=ms"])
def test_tiny_presets_beat_a_unigram_model_within_60_steps(name):
    """conf/model at the tests' tiny sizes, 60 AdamW steps on random windows of tiny shakespeare's train
    split; scored on 64 windows of its val split against the train split's character frequencies."""
    text = (ROOT / "charlm" / "corpora" / "tinyshakespeare.txt").read_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:200_000]])
    train, val = ids[:180_000], ids[180_000:]
    model_name, _, opt = name.partition(":")
    sizes = dict(TINY_SIZES, **dict([opt.split("=")] if opt else []))
    torch.manual_seed(0)
    model = build_model(model_config(model_name, 32, sizes), len(chars))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        w = train[torch.randint(len(train) - 33, (16,), generator=g)[:, None] + torch.arange(33)]  # (16, 33)
        loss = F.cross_entropy(model(w[:, :-1])[0].flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    w = val[torch.arange(64)[:, None] * 300 + torch.arange(33)]                 # (64, 33)
    with torch.no_grad():
        model_loss = float(F.cross_entropy(model.eval()(w[:, :-1])[0].flatten(0, 1), w[:, 1:].flatten()))
    freq = torch.bincount(train, minlength=len(chars)).double() + 1
    unigram = float(-(freq / freq.sum()).log()[w[:, 1:].flatten()].mean())
    assert math.isfinite(model_loss) and model_loss < unigram - 0.3, (model_loss, unigram)  # ~2.45 vs 3.31 nats
