"""ZAYA1's model-level parts beyond attention and router: the fp32 residual stream under bf16 weights, and the
zaya1_tiny preset in the trainer (which marks EOS as the document end; KV panel with CCA's constant state)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moesaic.configs import load_config
from moesaic.model import Transformer


def test_fp32_residual_stream_with_bf16_weights():
    cfg = load_config("zaya1_tiny", ["model.hidden_size=64", "model.vocab_size=256"]).model
    torch.manual_seed(0)
    model = Transformer(cfg).bfloat16()
    streams: list[torch.dtype] = []
    for block in model.layers:
        block.register_forward_hook(lambda _m, _i, out: streams.append(out[0].dtype))
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert streams == [torch.float32] * cfg.num_layers
    assert math.isfinite(out.loss.item())
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in model.parameters())
    plain = Transformer(load_config("zaya1_tiny", ["model.hidden_size=64", "model.vocab_size=256",
                                                   "model.fp32_residual=false"]).model).bfloat16()
    streams.clear()
    for block in plain.layers:
        block.register_forward_hook(lambda _m, _i, out: streams.append(out[0].dtype))
    plain(ids)
    assert streams == [torch.bfloat16] * cfg.num_layers


def test_zaya1_tiny_trains_with_its_panels(tmp_path: Path) -> None:
    from trainrun import train_briefly

    logged = train_briefly(tmp_path, "zaya1_tiny")
    assert 0 < logged["attn_layers/L00/mass_first"] < 1
    state = (6 * 32 * 2 + 2 * 32 // 2) * 4  # two raw [q ; k] rows and one delayed value row, fp32
    assert logged["kv_layers/L00/4k/bytes_per_token"] == 2 * 2 * 32 * 4 + state / 4096
    assert logged["kv_layers/L01/4k/bytes_per_token"] == (32 * 2 * 2 * 32 * 4 + state) / 4096


def test_mtp_block_with_cca_reads_its_own_documents():
    """An MTP block of depth d runs on tokens d.. of the sequence: its cca layer reads the document ends from there
    (their length matches its tokens') and trains."""
    cfg = load_config("zaya1_tiny", ["model.hidden_size=64", "model.vocab_size=256", "model.mtp_layers=1",
                                     "model.mtp_layer_type=cca"]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(1, 256, (2, 12))
    ids[:, 5] = 0
    model.doc_end_token = 0
    out = model(ids, labels=ids)
    out.loss.backward()
    assert math.isfinite(out.mtp_loss.item())
    assert model.mtp[0].attn.temp.grad is not None
