"""Checkpoint conversion between moesaic's native format and transformers' (DeepSeek-V4, Qwen3-MoE, Gemma 4,
Laguna, ZAYA1).

Every path streams: tensors are read one at a time (``safe_open``) and written as their turn
comes, or copied straight into an existing model's parameters; expected names and shapes come
from a model built on the meta device, which allocates nothing. Output directories appear only
when complete (``atomic_directory``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moesaic.configs import ConfigError, ModelConfig

from ..transformer import Transformer
from .architecture import check_same_architecture
from .family import Family, family_for_hf, family_for_model
from .safetensors_io import (ConversionError, SafetensorsDir, TensorPlan, atomic_directory, write_safetensors,
                             write_sharded)
from .tensor_map import Shapes, read_plans, unstored, write_plans

NATIVE_CONFIG = "config.yaml"
NATIVE_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def _state_shapes(model: Transformer) -> Shapes:
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def expected_state(cfg: ModelConfig) -> Shapes:
    """Name -> (shape, dtype) of every saved tensor of a model of ``cfg``, without allocating it."""
    with torch.device("meta"):
        return _state_shapes(Transformer(cfg))


def read_native_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / NATIVE_CONFIG
    if not path.is_file():
        raise ConfigError(f"{directory} is not a moesaic checkpoint: {NATIVE_CONFIG} is missing")
    try:
        loaded = OmegaConf.load(path)
        if "model" in loaded:
            raise ConfigError(f"{directory} holds a run config ({NATIVE_CONFIG} with a 'model:' section), not a "
                              f"native checkpoint; export a training checkpoint with "
                              f"`moesaic export {directory} OUT_DIR`")
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _read_hf(directory: str | Path, src: SafetensorsDir) -> tuple[Family, ModelConfig]:
    """The family and ModelConfig of a transformers checkpoint directory."""
    path = Path(directory) / HF_CONFIG
    if not path.is_file():
        raise ConfigError(f"{directory} is not a transformers checkpoint: {HF_CONFIG} is missing")
    try:
        hf = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    family = family_for_hf(hf, str(path))
    return family, family.from_hf(hf, src.keys(), str(path))


def read_hf_config(directory: str | Path, src: Optional[SafetensorsDir] = None) -> ModelConfig:
    """The ModelConfig of a transformers checkpoint directory (of any family; V4's MTP blocks counted from its
    tensors)."""
    return _read_hf(directory, src or SafetensorsDir(directory))[1]


def from_hf_config(hf: dict, tensor_names: frozenset[str] = frozenset(), source: str = HF_CONFIG) -> ModelConfig:
    """The ModelConfig of a config.json (``tensor_names``: the checkpoint's, where the family reads its layout)."""
    return family_for_hf(hf, source).from_hf(hf, set(tensor_names), source)


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The config.json exporting ``cfg``, in the family ``family_for_model`` infers (ConfigError: the field
    that stops it)."""
    return family_for_model(cfg).to_hf(cfg, dtype)


def _check_native(src: SafetensorsDir, expected: Shapes) -> None:
    """A native directory must hold exactly the tensors its config.yaml implies."""
    for name, (shape, _) in expected.items():
        if name not in src:
            raise ConversionError(f"tensor '{name}' is missing from {src.directory}")
        if src.shape(name) != shape:
            raise ConversionError(f"tensor '{name}' in {src.directory} has shape {list(src.shape(name))}, "
                                  f"but its {NATIVE_CONFIG} implies {list(shape)}")
    extra = sorted(src.keys() - expected.keys())
    if extra:
        raise ConversionError(f"tensor '{extra[0]}' in {src.directory} is not part of the model its "
                              f"{NATIVE_CONFIG} describes")


@torch.no_grad()
def _copy_into(model: Transformer, plans: list[TensorPlan]) -> None:
    """Load each planned tensor straight into the model's parameter or buffer of that name."""
    state = model.state_dict(keep_vars=True)
    for plan in plans:
        target = state[plan.name]
        target.copy_(plan.load().to(dtype=target.dtype, device=target.device))


def save_native(model: Transformer, directory: str | Path) -> Path:
    """Write ``model`` as a native checkpoint: ``config.yaml`` (its ModelConfig) + ``model.safetensors``."""
    state = model.state_dict()
    plans = [TensorPlan(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in state.items()]
    with atomic_directory(directory) as tmp:
        (tmp / NATIVE_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(model.cfg)))
        write_safetensors(tmp / NATIVE_WEIGHTS, plans, {"moesaic": "native"})
    return Path(directory)


def load_native(directory: str | Path) -> Transformer:
    """Build the model a native checkpoint describes and load its tensors."""
    cfg = read_native_config(directory)
    model = Transformer(cfg)
    src = SafetensorsDir(directory)
    expected = _state_shapes(model)
    _check_native(src, expected)
    _copy_into(model, [TensorPlan(n, src.dtype(n), shape, lambda n=n: src.get(n))
                       for n, (shape, _) in expected.items()])
    return model


def load_hf_into(model: Transformer, directory: str | Path) -> None:
    """Overwrite ``model``'s weights with a transformers checkpoint of any family (``model.init_from``).

    ConfigError names the first model field where ``model.cfg`` and the checkpoint's config.json
    disagree; ConversionError names a missing, misshapen or unexpected tensor.
    """
    src = SafetensorsDir(directory)
    family, cfg = _read_hf(directory, src)
    check_same_architecture(model.cfg, cfg, str(directory))
    _copy_into(model, read_plans(family.names(cfg, frozenset(src.keys())), src, _state_shapes(model)))


def import_hf(hf_dir: str | Path, native_dir: str | Path) -> Path:
    """transformers checkpoint (any family) -> new native checkpoint directory, tensor by tensor."""
    src = SafetensorsDir(hf_dir)
    family, cfg = _read_hf(hf_dir, src)
    plans = read_plans(family.names(cfg, frozenset(src.keys())), src, expected_state(cfg))
    with atomic_directory(native_dir) as tmp:
        (tmp / NATIVE_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        write_safetensors(tmp / NATIVE_WEIGHTS, plans, {"moesaic": "native"})
    return Path(native_dir)


def export_hf(native_dir: str | Path, hf_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Native checkpoint -> new transformers checkpoint directory of the family the model has, tensor by tensor.

    ``<Family>ForCausalLM.from_pretrained(hf_dir)`` then reproduces the model's logits; DeepSeek-V4's
    MTP blocks are written under ``mtp.{i}.*``, which transformers skips.
    """
    cfg = read_native_config(native_dir)
    src = SafetensorsDir(native_dir)
    expected = expected_state(cfg)
    _check_native(src, expected)
    native = {name: (shape, src.dtype(name)) for name, (shape, _) in expected.items()}
    dtype = str(src.dtype("embed.weight")).removeprefix("torch.")
    family = family_for_model(cfg)
    hf_config = family.to_hf(cfg, dtype)
    plan = family.names(cfg)
    for name in unstored(plan, native):
        if src.get(name).any():
            raise ConversionError(f"tensor '{name}' in {native_dir} is nonzero, but {family.name} checkpoints have "
                                  f"no place for it (it would read back as zeros)")
    with atomic_directory(hf_dir) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        stored = src.dtype("embed.weight")
        constants = [TensorPlan(key, stored, tuple(t.shape), lambda t=t: t.to(stored))
                     for key, t in family.constant_tensors(cfg).items()]
        write_sharded(tmp, write_plans(plan, src.get, native) + constants, max_shard_bytes)
    return Path(hf_dir)


def convert(src: str | Path, dst: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Convert either way, by what ``src`` is (config.json: transformers; config.yaml: native); returns the
    direction and the family."""
    if (Path(src) / HF_CONFIG).is_file():
        import_hf(src, dst)
        return f"transformers -> native ({family_for_model(read_native_config(dst)).name})"
    if (Path(src) / NATIVE_CONFIG).is_file():
        export_hf(src, dst, max_shard_bytes)
        return f"native -> transformers ({family_for_model(read_native_config(src)).name})"
    raise ConfigError(f"{src} is neither a transformers checkpoint ({HF_CONFIG}) nor a moesaic one ({NATIVE_CONFIG})")
