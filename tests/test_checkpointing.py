"""Activation checkpointing (``train.activation_checkpointing``): the same loss, gradients and side
effects as without, with fewer activations held between the forward and the backward."""

from __future__ import annotations

import gc
from collections import defaultdict, deque
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model import Transformer
from moesaic.model.attention import StatsSink
from moesaic.model.attention.presets import v4_attention
from moesaic.model.checkpointing import apply_activation_checkpointing

from numerics import assert_close_scaled

pytestmark = pytest.mark.numerics


class HeldBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the mode that are still alive: after a forward, what autograd
    (and checkpointing, whose own saved tensors a saved_tensors_hooks would not see) holds for the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self.storages.setdefault(ref.cdata, (ref, storage.nbytes()))
        return out

    def held(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def v4_tiny(backend: str = "auto") -> ModelConfig:
    """Every V4 layer type, mHC, routed + shared experts and an MTP block."""
    a = v4_attention(num_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16,
                     window=8, query_chunk=16, csa_ratio=4, hca_ratio=8, index_heads=4, index_head_dim=16,
                     index_topk=4, backend=backend)
    return ModelConfig(vocab_size=128, hidden_size=48, num_layers=3, layer_types=["swa", "csa", "hca"],
                       ffn_types=["moe"] * 3, hc_mult=4, mtp_layers=1, attention=a,
                       moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=32, bias_update_rate=0.01))


def run(mode: str, backend: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Transformer(v4_tiny(backend)).train()
    apply_activation_checkpointing(model, mode)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    sink = StatsSink()
    with HeldBytes() as held:
        out = model(ids, labels=ids, stats=sink)
        held_bytes = held.held()
    out.loss.backward()
    return {"loss": out.loss.detach(), "held": held_bytes,
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "loads": [r.load_counts.clone() for r in model.routers()],
            "stats": {(i, k): v[0] for i, s in sink.items() for k, v in s.means.items()}}


@pytest.mark.parametrize("backend", ["auto", "torch"])  # the compiled CPU kernels; the torch ops GPUs run
def test_checkpointing_keeps_loss_gradients_and_side_effects_and_holds_less(backend: str) -> None:
    base = run("none", backend)
    assert len(base["grads"]) > 50 and base["stats"]
    held = {"none": base["held"]}
    for mode in ("block", "selective"):
        got = run(mode, backend)
        held[mode] = got["held"]
        assert_close_scaled(got["loss"], base["loss"], 2, f"{mode}: loss")
        assert got["grads"].keys() == base["grads"].keys()
        for name, g in base["grads"].items():
            assert_close_scaled(got["grads"][name], g, 2, f"{mode}: {name}")
        # The recompute neither counted the routers' loads again nor added to the attention statistics.
        for a, b in zip(got["loads"], base["loads"], strict=True):
            assert torch.equal(a, b)
        assert got["stats"].keys() == base["stats"].keys()
        for key, v in base["stats"].items():
            assert torch.equal(got["stats"][key], v), key
    print("bytes held after the forward:", held)
    assert held["block"] < 0.5 * held["none"]
    assert held["block"] < held["selective"] < held["none"]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="activation checkpointing"):
        apply_activation_checkpointing(Transformer(v4_tiny()), "layers")


def test_selective_replay_hands_back_the_forward_products_in_order_and_checks_their_count() -> None:
    """The recompute receives the forward's products by position (not recomputed: other inputs give the kept
    values) unless one was changed in place since; running more or fewer products than the forward fails loudly."""
    from moesaic.model.checkpointing import _KeptProducts, products_not_kept

    a, b = torch.randn(4, 8), torch.randn(8, 8)
    kept: dict = defaultdict(deque)
    with _KeptProducts(kept, replay=False):
        first, second = a @ b, torch.tanh(a) @ b
    with _KeptProducts(kept, replay=True):
        assert torch.equal(torch.zeros(4, 8) @ b, first) and torch.equal(a @ b, second)
    with _KeptProducts(kept, replay=False):
        product = a @ b
    with pytest.raises(RuntimeError, match="more often than the forward"):
        with _KeptProducts(kept, replay=True):
            a @ b, a @ b
    with _KeptProducts(kept, replay=False):
        product = a @ b
    product.relu_()  # changed after the forward: the replay computes it again
    with _KeptProducts(kept, replay=True):
        assert torch.equal(torch.zeros(4, 8) @ b, torch.zeros(4, 8))
    with _KeptProducts(kept, replay=False), products_not_kept():  # e.g. the indexer's selection scores
        a @ b
    assert not any(kept.values())
    with _KeptProducts(kept, replay=False):
        a @ b
    with pytest.raises(RuntimeError, match="fewer matrix products"):
        with _KeptProducts(kept, replay=True):
            pass
