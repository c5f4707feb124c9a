"""The CSA indexer's Triton scores (``model.attention.backend="triton"``) against the torch ops, on CPU in
Triton's interpreter (conftest sets TRITON_INTERPRET; on a GPU machine the same tests run the compiled kernel)."""

from __future__ import annotations

import pytest
import torch

from moesaic.configs import ConfigError, load_config
from moesaic.model.attention._indexer_triton import indexer_scores
from moesaic.model.attention.indexer import Indexer

from numerics import assert_close_scaled
from triton_sm90 import run_script
import test_compressor

pytestmark = pytest.mark.numerics
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter mis-handles bf16 tl.dot (triton issue 11584): bf16 on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [16, 32])
def test_scores_match_the_torch_formula(dtype: torch.dtype, c: int) -> None:
    """sum_h w relu(q.k) against fp64; tile edges in both S (37 of 32-query tiles) and N (70 of 64-entry tiles).
    16-bit queries multiply keys rounded alike (exact products, fp32 sums): the reference rounds the keys too."""
    g = torch.Generator().manual_seed(0)
    B, S, H, N = 2, 37, 4, 70
    q = torch.randn(B, S, H, c, generator=g).to(dtype)
    w, keys_t = torch.randn(B, S, H, generator=g), torch.randn(B, c, N, generator=g)
    got = indexer_scores(q.to(DEVICE), w.to(DEVICE), keys_t.to(DEVICE)).cpu()
    ref = Indexer._scores_t(q.double(), w.double(), keys_t.to(dtype).double())
    assert got.dtype == torch.float32
    assert_close_scaled(got, ref, 16, f"scores {dtype}")


def test_selection_with_ties_and_chunks_as_the_torch_ops() -> None:
    """The tie and chunking tests of the torch and compiled paths, through the Triton scores."""
    test_compressor.test_topk_ties_break_toward_lower_index("triton")
    test_compressor.test_chunked_selection_equals_unchunked_exactly("triton")


def test_kernel_compiles_for_a_gpu_without_spills() -> None:
    """The scores kernel compiles for sm_90 (Triton's own ptxas, no GPU needed; the interpreter above never
    lowers it) at index widths 64 and 128 (V4-Flash's), bf16 and fp32, without spilling registers to the stack."""
    lines = run_script("indexer_triton_compile.py")
    builds = sorted((c, d) for c in ("64", "128") for d in ("bf16", "fp32"))
    assert sorted((c, dtype) for c, dtype, *_ in lines) == builds
    for c, dtype, *usage in lines:
        assert len(usage) == 2 and usage[0].startswith("REG:") and usage[1] == "STACK:0", (c, dtype, usage)


def test_config_checks_the_index_width() -> None:
    assert load_config("v4_tiny", ["model.attention.backend=triton"]).model.attention.backend == "triton"
    with pytest.raises(ConfigError, match="index_head_dim a power of 2"):
        load_config("v4_tiny", ["model.attention.backend=triton", "model.attention.menu.csa.index_head_dim=24"])
