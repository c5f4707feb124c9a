"""The two checkpoint layouts a transformers model reaches us in, for the import tests of every family."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from moesaic.model.attention.indexer import _exact_topk
from moesaic.model.interop import import_hf


def import_both_layouts(hf: torch.nn.Module, tmp_path: Path) -> list[Path]:
    """Write ``hf`` as its ``save_pretrained`` writes it (which reverts part of transformers' load-time renaming,
    e.g. per-expert matrices) and as its module state dict as is (fused experts, a tied ``lm_head.weight``);
    import each into a native checkpoint and return their directories."""
    hf.save_pretrained(tmp_path / "saved")
    (tmp_path / "raw").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "raw" / "config.json")
    # clone: safetensors refuses tensors that share storage (tied weights) or are not contiguous
    save_file({k: v.clone() for k, v in hf.state_dict().items()}, str(tmp_path / "raw" / "model.safetensors"))
    natives = [tmp_path / "native_a", tmp_path / "native_b"]
    for src, native in zip(("saved", "raw"), natives):
        import_hf(tmp_path / src, native)
    return natives


@contextlib.contextmanager
def spec_tie_topk() -> Iterator[list[int]]:
    """Within it, ``Tensor.topk`` over the last dim breaks exact ties toward the lower index, as moesaic's
    indexer does (MODEL_SPEC §13.4). Transformers' indexer calls ``topk`` as is, which picks arbitrarily among
    scores tied at the k-th value; ReLU makes such ties (score 0) common in a trained CSA indexer, so without
    this a reference run differs at the few queries where the two picks differ. Yields a one-item list that
    counts the rows where a tie decided what was left out."""
    plain = torch.Tensor.topk
    tied = [0]

    def topk(self: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
        if not largest or dim not in (-1, self.dim() - 1):
            return plain(self, k, dim=dim, largest=largest, sorted=sorted)
        values, _ = plain(self, k, dim=-1)
        kth = values[..., -1:]
        tied[0] += int((((self == kth).sum(-1) > (values == kth).sum(-1)) & (kth[..., 0] > float("-inf"))).sum())
        torch.Tensor.topk = plain  # _exact_topk calls topk itself
        try:
            picked = _exact_topk(self, k)
        finally:
            torch.Tensor.topk = topk
        return torch.return_types.topk((self.gather(-1, picked), picked))

    torch.Tensor.topk = topk
    try:
        yield tied
    finally:
        torch.Tensor.topk = plain
