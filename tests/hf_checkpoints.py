"""The two checkpoint layouts a transformers model reaches us in, for the import tests of every family."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

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
