"""The attention budget planner: each layer's menu entry chosen so the model's KV cache fits a byte budget.

Every decoder layer gets a list of ``Choice``s: menu entries its trained weights can run (the
entry's layer parameters are a subset, by name and shape, of the layer's own: a CSA layer can
run as SWA, not as HCA, whose compressor differs), restricted to the kinds asked for, plus
variants with a smaller ``index_topk`` where an entry has that field. KV bytes and FLOPs come
from the registry (``AttentionSpec.kv_bytes`` / ``flops_per_token``), so a new type joins the
menu without changes here. Each choice carries a predicted cost (loss increase, or a proxy of
it; see trainer/budget_costs.py) and the costs of layers are taken to add up.

``plan`` is exact: a multiple-choice knapsack solved by dynamic programming over layers on the
Pareto frontier of (bytes, FLOPs) -> least cost, so the returned layout has the least total
predicted cost of all layouts within the budgets; among equal costs it holds the most bytes.
Hence no single layer can be switched to a choice with more bytes and no higher cost without
breaking a budget (tests/test_budget.py checks both against brute force).

Layers whose K/V another layer reads (``kv_source``) and the readers themselves keep their
entry: switching the source would change what the readers see.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from moesaic.configs import ConfigError
from moesaic.configs.schema import ModelConfig

from .attention.base import AttentionSpec, layer_specs, resolve_menu
from .attention.elastic import ElasticAttention, ElasticSpec


@dataclass(frozen=True)
class Choice:
    """One menu entry a layer may use, with its decode-cache bytes at the target context and its FLOPs."""

    entry: str  # menu entry name (a derived top-k variant is named <entry>_k<topk>)
    spec: AttentionSpec
    kv_bytes: float  # one sequence at the target context
    flops: float  # attention FLOPs per trained token at the training length
    current: bool = False  # the layer's trained entry


@dataclass(frozen=True)
class Plan:
    choices: list[Choice]  # one per decoder layer
    costs: list[float]  # predicted cost of each layer's choice

    @property
    def kv_bytes(self) -> float:
        return sum(c.kv_bytes for c in self.choices)

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.choices)

    @property
    def cost(self) -> float:
        return sum(self.costs)


def _param_shapes(spec: AttentionSpec, cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory even for full-size configs
        module = spec.build(cfg, layer)
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def topk_variants(menu: dict[str, AttentionSpec], topks: Sequence[int]) -> dict[str, AttentionSpec]:
    """``menu`` plus, for every entry with an ``index_topk`` field, copies at each smaller ``topks`` value."""
    out = dict(menu)
    for name, spec in menu.items():
        current = getattr(spec, "index_topk", None)
        for k in sorted(set(topks), reverse=True):
            if current is not None and 0 < k < current:
                out[f"{name}_k{k}"] = dataclasses.replace(spec, index_topk=k)  # type: ignore[call-arg]
    return out


def layer_choices(cfg: ModelConfig, context: int, seq_len: int, fmt: str = "bf16", index_fmt: Optional[str] = None,
                  kinds: Optional[Sequence[str]] = None, topks: Sequence[int] = ()) -> list[list[Choice]]:
    """Every decoder layer's choices, cheapest KV first (ties by name): an elastic layer's modes, else the
    menu entries its weights can run (``topks``: with smaller-top-k variants)."""
    index_fmt = index_fmt or fmt
    menu = topk_variants(resolve_menu(cfg), topks)
    specs = layer_specs(cfg)[:cfg.num_layers]
    pinned = {i for i, s in enumerate(specs) if s.own_kv() != s}
    pinned |= {getattr(s, "kv_source") for i, s in enumerate(specs) if i in pinned}
    unknown = sorted(set(kinds or ()) - {s.kind for s in menu.values()})
    if unknown:
        raise ConfigError(f"--types {unknown[0]} is not the kind of any model.attention.menu entry "
                          f"(kinds there: {', '.join(sorted({s.kind for s in menu.values()}))})")
    shapes = {name: _param_shapes(spec, cfg, 0) for name, spec in menu.items() if spec.own_kv() == spec}
    out = []
    for i, spec in enumerate(specs):
        entry = cfg.attention_type(i)
        if isinstance(spec, ElasticSpec):
            candidates = topk_variants(spec.mode_specs(), topks)
        elif i in pinned:
            candidates = {entry: spec}
        else:
            own = _param_shapes(spec, cfg, i)
            candidates = {name: s for name, s in menu.items()
                          if name in shapes and all(own.get(k) == v for k, v in shapes[name].items())}
        allowed = {n: s for n, s in candidates.items() if kinds is None or s.kind in kinds or i in pinned}
        if not allowed:
            raise ConfigError(f"layer {i} ('{entry}', {spec.kind}) has no choice among --types {','.join(kinds or [])} "
                              f"that its weights can run (it runs: {', '.join(sorted(candidates))})")
        current = spec.default_mode() if isinstance(spec, ElasticSpec) else entry
        choices = [Choice(n, s, sum(s.kv_bytes(context, fmt, index_fmt)), s.flops_per_token(seq_len),
                          current=(n == current)) for n, s in allowed.items()]
        out.append(sorted(choices, key=lambda c: (c.kv_bytes, c.flops, c.entry)))
    return out


State = dict[tuple[float, float], tuple[float, tuple[int, ...]]]


def plan(choices: list[list[Choice]], costs: list[list[float]], kv_budget: float,
         flops_budget: float = math.inf) -> Plan:
    """The layout of least total cost with KV bytes <= kv_budget and FLOPs <= flops_budget (exact).

    ``costs[i][j]`` is the predicted cost of ``choices[i][j]``. Ties: the most bytes, then the most
    FLOPs, then the earlier choices (choice order). Raises ConfigError when even the cheapest
    layout exceeds a budget.
    """
    # Frontier: (bytes, flops) -> (cost, picks); a state is dropped when another has <= bytes and flops and a
    # lower cost (that one completes every layout this one does, cheaper). Without a FLOPs budget flops is 0.
    bounded = math.isfinite(flops_budget)
    frontier: State = {(0.0, 0.0): (0.0, ())}
    for layer, options in enumerate(choices):
        nxt: State = {}
        for (b, f), (cost, picks) in frontier.items():
            for j, c in enumerate(options):
                key = (b + c.kv_bytes, f + c.flops if bounded else 0.0)
                if key[0] > kv_budget or key[1] > flops_budget:
                    continue
                value = (cost + costs[layer][j], picks + (j,))
                if key not in nxt or value < nxt[key]:
                    nxt[key] = value
        frontier = _pareto(nxt)
        if not frontier:
            low = sum(min(c.kv_bytes for c in o) for o in choices)
            raise ConfigError(f"--kv-budget {kv_budget:,.0f} B (--flops-budget {flops_budget:g}) cannot be met: "
                              f"the smallest layout needs {low:,.0f} B of KV cache")
    (_, _), (_, picks) = min(frontier.items(), key=lambda kv: (kv[1][0], -kv[0][0], -kv[0][1], kv[1][1]))
    return Plan([choices[i][j] for i, j in enumerate(picks)], [costs[i][j] for i, j in enumerate(picks)])


def _pareto(states: State) -> State:
    """The states that no state with <= bytes and <= FLOPs beats on cost (equal costs stay, so the final
    pick can prefer more bytes). One resource (FLOPs all 0): a sweep by bytes; two: pairwise."""
    order = sorted(states.items(), key=lambda kv: kv[0])
    if all(key[1] == 0.0 for key, _ in order):
        kept, best = [], math.inf
        for key, value in order:
            if value[0] <= best:
                kept.append((key, value))
                best = value[0]
        return dict(kept)
    return {key: value for key, value in order
            if not any(k[0] <= key[0] and k[1] <= key[1] and v[0] < value[0] for k, v in order)}


def planned_model(cfg: ModelConfig, chosen: Plan) -> ModelConfig:
    """``cfg`` with the plan's entries as its layer types; choices that are not menu entries (top-k variants,
    elastic modes) join the menu under their name, or ``<name>_planned`` if the menu uses the name otherwise."""
    menu, resolved, names = dict(cfg.attention.menu), resolve_menu(cfg), []
    for c in chosen.choices:
        name = c.entry
        while name in menu and resolved.get(name) != c.spec:
            name += "_planned"
        if name not in menu:
            menu[name] = dataclasses.asdict(c.spec)
            resolved[name] = c.spec
        names.append(name)
    attention = dataclasses.replace(cfg.attention, menu=menu)
    return dataclasses.replace(cfg, attention=attention, layer_types=names)


def format_plan(chosen: Plan, context: int, kv_budget: float, cost_unit: str) -> str:
    """The table ``moesaic budget`` prints: per layer its choice, KV bytes at ``context`` and predicted cost."""
    mib = 2 ** 20
    width = max(6, *(len(c.entry) for c in chosen.choices))
    lines = [f"attention budget: {kv_budget / mib:,.1f} MiB of KV cache for one sequence of {context:,} tokens",
             f"{'layer':>5} {'choice':>{width}} {'kind':>5} {'KV MiB':>10} {'FLOPs/tok':>10} {'cost':>10}"]
    lines += [f"{i:>5} {c.entry:>{width}} {c.spec.kind:>5} {c.kv_bytes / mib:>10.3f} {c.flops:>10.3g} {cost:>10.4f}"
              for i, (c, cost) in enumerate(zip(chosen.choices, chosen.costs))]
    lines.append(f"total: {chosen.kv_bytes / mib:,.3f} MiB ({chosen.kv_bytes / context:,.1f} B/token) of "
                 f"{kv_budget / mib:,.3f} MiB; predicted cost {chosen.cost:.4f} ({cost_unit})")
    return "\n".join(lines)


CACHE_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def fit_modes(model: torch.nn.Module, tokens: int, kv_budget: Optional[float], batch_size: int = 1) -> Optional[Plan]:
    """The budget controller of decoding: set each elastic layer's inference mode so the decode cache of
    ``batch_size`` sequences of ``tokens`` tokens fits ``kv_budget`` bytes with the least total mode cost
    (``ElasticSpec.mode_cost``); None resets every elastic layer to its ``eval_mode``. Returns the plan."""
    layers = [block.attn for block in model.layers]  # type: ignore[attr-defined]
    elastic = [a for a in layers if isinstance(a, ElasticAttention)]
    if kv_budget is None or not elastic:
        for a in elastic:
            a.set_mode(None)
        return None
    cfg = model.cfg  # type: ignore[attr-defined]
    fmt = CACHE_FORMATS[model.head.weight.dtype]  # type: ignore[attr-defined]
    choices, costs = [], []
    for i, spec in enumerate(layer_specs(cfg)[:cfg.num_layers]):
        named = spec.mode_specs() if isinstance(spec, ElasticSpec) else {cfg.attention_type(i): spec}
        # Caches keep indexer keys in fp32 whatever the model's dtype (attention/cache.py).
        options = [Choice(n, s, batch_size * sum(s.kv_bytes(tokens, fmt, "fp32")), 0.0) for n, s in named.items()]
        choices.append(options)
        costs.append([spec.mode_cost(c.entry) if isinstance(spec, ElasticSpec) else 0.0 for c in options])
    chosen = plan(choices, costs, kv_budget)
    for attn, choice in zip(layers, chosen.choices):
        if isinstance(attn, ElasticAttention):
            attn.set_mode(choice.entry)
    return chosen
