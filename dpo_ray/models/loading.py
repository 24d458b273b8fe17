"""Models and tokenizers: resolve, load, fingerprint, and build tiny ones for tests and demos.

A model reference is a local directory, a URI (`s3://`, `gs://`, anything fsspec opens: copied once
into a local cache), or a Hugging Face hub id (downloaded with huggingface_hub). Everything downstream
gets a local directory, which both transformers and vLLM load. Only safetensors weights are loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from dpo_ray.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "ModelNotFoundError",
    "disable_dropout",
    "exact_attention",
    "load_causal_lm",
    "load_tokenizer",
    "model_fingerprint",
    "ref_kind",
    "resolve_model_dir",
    "tokenizer_fingerprint",
]


class ModelNotFoundError(UserError, FileNotFoundError):
    """A configured model (or tokenizer) path or URI that holds no model: the message names it."""


_MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json"]
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.*"]


def _default_cache_dir() -> Path:
    """DPO_RAY_CACHE (default ~/.cache/dpo_ray)/models. A `{node}` in DPO_RAY_CACHE is replaced by the Ray node
    id of the process (`local` outside Ray): nodes that share a disk still keep one copy each."""
    root = os.environ.get("DPO_RAY_CACHE", str(Path.home() / ".cache" / "dpo_ray"))
    if "{node}" in root:
        root = root.replace("{node}", _ray_node())
    return Path(root) / "models"


def _ray_node() -> str:
    import sys

    ray = sys.modules.get("ray")  # never imported here just to ask
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return "local"


def ref_kind(ref: str) -> str:
    """The one rule for what a model/tokenizer/input reference is: "uri" (scheme://, file:// aside),
    "local" (exists, starts with ".", "/" or "~", or has two or more slashes: not a hub org/name), or "hub"."""
    if "://" in ref and not ref.startswith("file://"):
        return "uri"
    path = ref.removeprefix("file://")
    if os.path.exists(os.path.expanduser(path)) or path.startswith((".", "/", "~")) or path.count("/") >= 2:
        return "local"
    return "hub"


def resolve_model_dir(ref: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local directory holding the model or tokenizer `ref` names (see the module docstring)."""
    ref = str(ref)
    local = Path(ref.removeprefix("file://")).expanduser()
    if local.is_dir():
        return local
    cache = Path(cache_dir) if cache_dir else _default_cache_dir()
    kind = ref_kind(ref)
    if kind == "uri":
        import shutil

        import fsspec

        fs, root = fsspec.core.url_to_fs(ref)
        root = root.rstrip("/")
        files = sorted(f for f in fs.find(root) if not f.endswith("/"))
        if not files:
            raise ModelNotFoundError(f"model {ref!r}: no files found under that URI")
        # The copy is named by the URI and the version of every file under it (name, size, the storage's
        # change key: an ETag on S3): a model rewritten at the same URI (a retrained export) is copied anew,
        # never served from an older copy. An export's manifest.json (written after the model, by the stage
        # that checks the model) is not part of the model: it would make a second copy of the same weights.
        model_files = [f for f in files if f[len(root) :].lstrip("/") != "manifest.json"]
        version = json.dumps([ref] + [[f, fs.size(f), str(fs.ukey(f))] for f in model_files])
        target = cache / hashlib.sha256(version.encode()).hexdigest()[:16]
        if not (target / ".complete").exists():
            # Copied into a private directory, then renamed into place: processes of one node that copy at
            # once never read each other's half-written files.
            tmp = cache / f".tmp-{target.name}-{os.getpid()}"
            for remote in files:
                dest = tmp / remote[len(root) :].lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get(remote, str(dest))
            (tmp / ".complete").touch()
            if target.exists() and not (target / ".complete").exists():
                shutil.rmtree(target, ignore_errors=True)  # left by an interrupted copy of an older version
            try:
                tmp.rename(target)
            except OSError:  # another process of this node finished first
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    if kind == "local":
        raise ModelNotFoundError(f"model {ref!r}: no such directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=ref, allow_patterns=_MODEL_FILES + _TOKENIZER_FILES, cache_dir=str(cache)))


def load_tokenizer(ref: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """A transformers tokenizer from a model reference, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(ref)), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def exact_attention(config: Any) -> str:
    """The transformers attention implementation that computes this model's attention exactly: SDPA, or
    eager where SDPA drops a feature of the model (attention-logit softcapping: Gemma-2; measured 0.23 nats
    of difference on a tiny Gemma-2)."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return "sdpa"


def load_causal_lm(ref: str | os.PathLike[str], dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    """A transformers causal LM (safetensors weights only) in `dtype`, in eval mode, with an attention
    implementation that is exact for it (`exact_attention`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(resolve_model_dir(ref))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation=exact_attention(config),
    )
    return model.eval()


def disable_dropout(model: Any) -> Any:
    """Dropout off everywhere (as TRL's DPOTrainer does by default): the DPO loss compares the policy's
    log-probs with the reference's, which were computed without dropout, so with dropout on, step 0 would
    not even start at policy == reference (GPT-2's configs default to 0.1). Returns the model."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the tokenizer's model (its tokenizer.json content), special tokens and chat template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    special = {
        name: [getattr(tokenizer, name, None), getattr(tokenizer, name + "_id", None)]
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    payload = {
        "tokenizer": backend,
        "special_tokens": special,
        "added": sorted(tokenizer.all_special_tokens),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_SAMPLES, _SAMPLE_BYTES = 64, 4096


def _safetensors_digest(path: Path) -> bytes:
    """Header (names, dtypes, shapes, offsets) plus 64 evenly spaced 4 KiB samples of the tensor bytes.

    The header alone is the same for every model of one architecture: fine-tuned weights must change the
    fingerprint, and a full hash of a 100 GB checkpoint is too slow for a check made at every stage start.
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(length))
        start = 8 + length
        span = max(1, size - start)
        for i in range(_SAMPLES):
            f.seek(start + span * i // _SAMPLES)
            h.update(f.read(_SAMPLE_BYTES))
    return h.digest()


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of config.json, generation_config.json (its stop tokens end generate's samples) and each
    safetensors file's name, size, header and sampled tensor bytes."""
    root = Path(model_dir)
    weights = sorted(root.glob("*.safetensors"))
    if not (root / "config.json").exists() or not weights:
        raise ModelNotFoundError(f"model_fingerprint: {root} needs config.json and *.safetensors weights")
    h = hashlib.sha256((root / "config.json").read_bytes())
    generation = root / "generation_config.json"
    h.update(generation.read_bytes() if generation.exists() else b"no generation_config.json")
    for w in weights:
        h.update(w.name.encode())
        h.update(str(w.stat().st_size).encode())
        h.update(_safetensors_digest(w))
    return h.hexdigest()
