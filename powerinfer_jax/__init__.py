"""PowerInfer-JAX: activation-sparse LLM inference on one accelerator plus the host.

    import powerinfer_jax as pij
    engine = pij.load("path/to/hf_model_dir")       # or pij.load() for the bundled model
    engine.generate("ROMEO:", max_new_tokens=64).text
"""

from __future__ import annotations

import os
from pathlib import Path

from powerinfer_jax.config import ModelConfig, UnsupportedModelError, load_config
from powerinfer_jax.engine import Engine, GenerationResult
from powerinfer_jax.loading import CheckpointError, load_params
from powerinfer_jax.sampling import SamplingParams

__all__ = [
    "CheckpointError",
    "Engine",
    "GenerationResult",
    "ModelConfig",
    "SamplingParams",
    "UnsupportedModelError",
    "default_model_dir",
    "load",
]

# The small ReLU-LLaMA trained on Tiny Shakespeare that ships with the repo.
DEFAULT_MODEL_NAME = "shakespeare-relu-llama"


def default_model_dir() -> str:
    """Folder of the bundled default model ($POWERINFER_JAX_DEFAULT_MODEL overrides it)."""
    env = os.environ.get("POWERINFER_JAX_DEFAULT_MODEL")
    if env:
        return env
    return str(Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL_NAME)


def load(model_dir: str | os.PathLike | None = None, dtype: str = "float32", max_seq_len: int | None = None) -> Engine:
    """Loads an HF model folder (config.json + safetensors [+ tokenizer.json]) into an Engine."""
    from powerinfer_jax.tokenizer import Tokenizer

    model_dir = str(model_dir) if model_dir is not None else default_model_dir()
    cfg = load_config(model_dir)
    params = load_params(model_dir, cfg, dtype=dtype)
    tokenizer = None
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        tokenizer = Tokenizer(model_dir, cfg.bos_token_id, cfg.eos_token_ids)
    return Engine(cfg, params, tokenizer, max_seq_len=max_seq_len, model_dir=model_dir)
