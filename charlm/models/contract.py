"""The model contract, written once: what charlm needs from a model, and what a model may offer.

Required: `logits, state = model(idx, state=None)` with idx (B, T) long -> logits (B, T, V), and a
state (tensors, or tuples/lists/dicts of tensors) that continues the sequence: chunked == whole.

Optional, each with its default (a model declares only what differs):

=====================  =====================================  ==========================================
capability             declared as                            default
=====================  =====================================  ==========================================
preferred sampling     class attr `preferred_sampling`        "stream" (truncated BPTT, state carried)
GPU precision          class attr `gpu_precision`             "32-true"
usable context         attr `context_size` (int or None)      None: unbounded (evaluated as streams);
                                                              an int: evaluated by a sliding window
auxiliary losses       method `aux_losses(idx, targets)`      none: {} (added to the training loss)
infill                 method `infill(vocab, text, ...)`      none: sampling refuses `infill=`
token embedding        method `token_embedding()`             the model's first nn.Embedding
gate openings          method `gate_openings(idx)`            none: {} (no `gates/...` metrics)
gate trace             method `gate_trace(idx, state=None)`   no gates: ({}, the state `model(idx, state)`
                       -> ({layer: (B, T) opening}, state),   gives); per-position memory-gate openings with
                       the state carried like forward's       the state carried (`charlm.explain`)
parameters not decayed class attr `no_weight_decay`         (): weight decay goes to every parameter with
                       (parameter names, matched as the       dim >= 2; a name listed here (e.g. Mamba's
                       last parts of the dotted name)         `A_log`, xLSTM's `embed.weight`) never decays
unit trace             method `unit_trace(idx, state=None)`   the features the output layer (the last
                       -> ({"layer{i}/KIND": (B, T, U)},      nn.Linear onto the vocabulary) reads, as
                       state), the state carried like         "layer0/h"; KIND is h (the hidden state a
                       forward's; in eval mode                layer passes on) or c (a cell state)
held units             method `hold_units(hold)`, a context   the output layer's input held, by a hook
                       manager: inside it forward and         (charlm.models.units)
                       unit_trace keep hold = {layer:
                       {unit: value}} at those values
=====================  =====================================  ==========================================

`capabilities(model)` is the one place that reads them; nothing else looks attributes up on a model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from charlm.models.units import default_hold_units, default_unit_trace

Sampling = Literal["stream", "random"]


@runtime_checkable
class CharModel(Protocol):
    """The required part: next-character logits and a state that continues the sequence."""

    def __call__(self, idx: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]: ...


@dataclass(frozen=True)
class Capabilities:
    """What a model declared, with the defaults filled in."""

    preferred_sampling: Sampling
    gpu_precision: str
    context_size: int | None
    aux_losses: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None
    infill: Callable[..., str] | None
    token_embedding: nn.Embedding
    gate_openings: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None
    no_weight_decay: tuple[str, ...] = ()
    gate_trace: Callable[..., tuple[dict[str, torch.Tensor], Any]] | None = None
    unit_trace: Callable[..., tuple[dict[str, torch.Tensor], Any]] | None = None
    hold_units: Callable[[dict[str, dict[int, float]]], AbstractContextManager] | None = None

    def decays(self, name: str, param: torch.Tensor) -> bool:
        """Whether weight decay applies to the parameter called `name` (dotted, as named_parameters gives it)."""
        return param.dim() >= 2 and not any(name == n or name.endswith("." + n) for n in self.no_weight_decay)

    @property
    def evaluation(self) -> str:
        """How the yardstick scores this model: "streams" (state carried) or "window" (sliding)."""
        return "streams" if self.context_size is None else "window"


def unwrap(model: nn.Module) -> nn.Module:
    """The model behind a `torch.compile` wrapper."""
    return getattr(model, "_orig_mod", model)


def _first_embedding(model: nn.Module) -> nn.Embedding:
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise TypeError(f"{type(model).__name__} has no nn.Embedding; define token_embedding() to name one")


def _no_gate_trace(model: nn.Module) -> Callable[..., tuple[dict[str, torch.Tensor], Any]]:
    """The default gate trace: no gates, and the state the forward pass carries."""

    @torch.no_grad()
    def trace(idx: torch.Tensor, state: Any = None) -> tuple[dict[str, torch.Tensor], Any]:
        return {}, model(idx, state)[1]

    return trace


def capabilities(model: nn.Module | type) -> Capabilities:
    """Read the optional parts of the contract from a model (or its class: then no bound methods)."""
    is_class = isinstance(model, type)
    m = model if is_class else unwrap(model)

    def method(name: str):
        return None if is_class else getattr(m, name, None)

    sampling = getattr(m, "preferred_sampling", "stream")
    if sampling not in ("stream", "random"):
        raise TypeError(f"{type(m).__name__}.preferred_sampling={sampling!r}: must be 'stream' or 'random'")
    context = getattr(m, "context_size", None)
    if is_class:
        embedding = None
    else:
        named = method("token_embedding")
        embedding = named() if named is not None else _first_embedding(m)
    return Capabilities(
        preferred_sampling=sampling,
        gpu_precision=getattr(m, "gpu_precision", "32-true"),
        context_size=None if context is None or isinstance(context, property) else int(context),
        aux_losses=method("aux_losses"),
        infill=method("infill"),
        token_embedding=embedding,
        gate_openings=method("gate_openings"),
        no_weight_decay=tuple(getattr(m, "no_weight_decay", ())),
        gate_trace=None if is_class else (method("gate_trace") or _no_gate_trace(m)),
        unit_trace=None if is_class else (method("unit_trace") or default_unit_trace(m, embedding.num_embeddings)),
        hold_units=None if is_class else (method("hold_units") or default_hold_units(m, embedding.num_embeddings)),
    )


def hydra_key_in(value: Any, where: str) -> str | None:
    """The dotted key of the first Hydra key (`_target_`, `_args_`, ...) anywhere inside `value`, or None."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, inner in items:
        dotted = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}"
        if isinstance(key, str) and key.startswith("_"):
            return dotted
        if (found := hydra_key_in(inner, dotted)) is not None:
            return found
    return None


def build_model(model_cfg: dict, vocab_size: int) -> nn.Module:
    """The model a config names: its class (`_target_`) called with the other keys and `vocab_size`.

    Only the top level names code: an argument is a plain value, and a `_target_` nested in one is refused,
    never built (a config read from a checkpoint is checked further by `charlm.checkpoint.check_section`)."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    from charlm.errors import ConfigError

    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    args = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    if (key := hydra_key_in(args, "model")) is not None:
        raise ConfigError(f"{key}: a Hydra key inside a model argument; a model config names one class, "
                          "and its arguments are plain values")
    return instantiate(cfg, vocab_size=vocab_size, _convert_="all", _recursive_=False)
