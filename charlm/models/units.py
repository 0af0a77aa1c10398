"""Units inside a model, read and held through forward hooks: the shared part of the contract's
`unit_trace` and `hold_units` for models whose units are the output of a submodule (the scan state of
minGRU, minLSTM and Hawk, the residual stream of Mamba and the transformer), and the default for a model
that declares neither (the features its output layer reads).

A *site* is a submodule and the tensor of it that holds the units: its output (or the output's first
element, for blocks that return (x, state)), or with `pre=True` its first input. Every such tensor is
(B, T, U), units last. A *hold* maps a layer name to {unit: value}: those units read `value` at every
position, whatever the model computed, so everything downstream (later positions through the state,
later layers, the logits) sees them fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn


class Site(NamedTuple):
    """Where a layer's units live: a submodule's output (or, with pre=True, its first input)."""

    module: nn.Module
    pre: bool = False


Hold = dict[str, dict[int, float]]  # layer name -> {unit: value}


def fixer(units: dict[int, float], like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (..., U) -> x with each listed unit replaced by its value (mask and values made once, on like's
    device and dtype, for a loop that applies them at every step)."""
    U = like.shape[-1]
    if any(not 0 <= u < U for u in units):
        raise IndexError(f"units {sorted(units)}: the layer has {U} units")
    mask = torch.zeros(U, dtype=torch.bool, device=like.device)
    value = torch.zeros(U, dtype=like.dtype, device=like.device)
    for u, v in units.items():
        mask[u], value[u] = True, v
    return lambda x: torch.where(mask, value, x)                     # (..., U)


def held(units: dict[int, float], x: torch.Tensor) -> torch.Tensor:
    """x (..., U) with each listed unit replaced by its value at every position."""
    return fixer(units, x)(x)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out, x):
    return (x, *out[1:]) if isinstance(out, (tuple, list)) else x


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside, every module's mode put back after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def hold_sites(sites: dict[str, Site], hold: Hold) -> Iterator[None]:
    """Inside: each held layer's site hands on its tensor with the held units fixed."""
    unknown = set(hold) - set(sites)
    if unknown:
        raise KeyError(f"no layer {sorted(unknown)}; the model has {sorted(sites)}")
    handles = []
    try:
        for name, units in hold.items():
            site = sites[name]
            if site.pre:
                handles.append(site.module.register_forward_pre_hook(
                    lambda m, args, u=units: (held(u, args[0]), *args[1:])))
            else:
                handles.append(site.module.register_forward_hook(
                    lambda m, args, out, u=units: _replace_first(out, held(u, _first(out)))))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_sites(sites: dict[str, Site]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside: every call of a site appends its (B, T, U) tensor (detached) to got[name]."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in sites}
    handles = []
    try:
        for name, site in sites.items():
            if site.pre:
                handles.append(site.module.register_forward_pre_hook(
                    lambda m, args, n=name: got[n].append(args[0].detach())))
            else:
                handles.append(site.module.register_forward_hook(
                    lambda m, args, out, n=name: got[n].append(_first(out).detach())))
        yield got
    finally:
        for h in handles:
            h.remove()


def site_trace(model: nn.Module, sites: dict[str, Site], run: Callable[[], object]):
    """({layer: (B, T, U)}, what `run()` returned): `run` called once in eval mode with every site captured;
    a site called more than once in the run has its tensors joined along time."""
    with evaluating(model), capture_sites(sites) as got:
        result = run()
    return {name: torch.cat(parts, 1).float() for name, parts in got.items() if parts}, result


def output_layer(model: nn.Module, vocab_size: int) -> nn.Linear | None:
    """The model's output layer as the default sees it: the last nn.Linear onto `vocab_size` outputs."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab_size]
    return heads[-1] if heads else None


def _head_sites(model: nn.Module, vocab_size: int) -> dict[str, Site]:
    head = output_layer(model, vocab_size)
    return {"layer0/h": Site(head, pre=True)} if head is not None else {}


def default_unit_trace(model: nn.Module, vocab_size: int):
    """The contract's default `unit_trace`: the features the output layer reads, as "layer0/h" (none when
    no output layer is found, or when it reads other than one vector per position)."""

    @torch.no_grad()
    def unit_trace(idx: torch.Tensor, state=None):
        acts, (_, state) = site_trace(model, _head_sites(model, vocab_size), lambda: model(idx, state))
        return {k: a for k, a in acts.items() if a.shape[:2] == idx.shape}, state

    return unit_trace


def default_hold_units(model: nn.Module, vocab_size: int):
    """The contract's default `hold_units`: the output layer's input held (see default_unit_trace)."""

    def hold_units(hold: Hold):
        return hold_sites(_head_sites(model, vocab_size), hold)

    return hold_units
