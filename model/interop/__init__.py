"""Checkpoints in and out: moesaic's native format and transformers' formats (families).

Native format: a directory with ``config.yaml`` (the ``ModelConfig``, as ``moesaic config`` prints
its ``model:`` section) and ``model.safetensors`` (the module's state dict: parameters and the
persistent buffers ``expert_bias`` and ``tid2eid``, official DeepSeek-V4 names, dtypes as trained).

transformers format: ``config.json`` + ``model.safetensors`` (or shards with
``model.safetensors.index.json``) that ``<Family>ForCausalLM.from_pretrained`` loads. Families
(``family.py``, one module each): DeepSeek-V4 (``deepseek_v4``, names in ``deepseek_v4_names``),
Qwen3-MoE (``qwen3_moe``), Gemma 4 text (``gemma4``), Laguna (``laguna``), ZAYA1 (``zaya``), DeepSeek-V3 and V3.2
(``deepseek_v3``). Import picks the family by config.json's ``model_type``; export by the shape of the ModelConfig
(``family_for_model``).

    export_hf(native_dir, hf_dir)      native -> transformers (moesaic convert NATIVE HF)
    import_hf(hf_dir, native_dir)      transformers -> native (moesaic convert HF NATIVE)
    save_native(model, dir) / load_native(dir)
    load_hf_into(model, hf_dir)        model.init_from: fill a built model from a transformers checkpoint
"""

from .architecture import architecture, check_same_architecture
from .convert import (convert, export_hf, from_hf_config, import_hf, load_hf_into, load_native, read_hf_config,
                      read_native_config, save_native, to_hf_config)
from .safetensors_io import ConversionError

__all__ = ["ConversionError", "architecture", "check_same_architecture", "convert", "export_hf", "from_hf_config",
           "import_hf", "load_hf_into", "load_native", "read_hf_config", "read_native_config", "save_native",
           "to_hf_config"]
