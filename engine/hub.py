"""Model resolution: a local directory, an embedded model name, or a Hugging Face Hub repo id."""
from __future__ import annotations

import os
import re
from pathlib import Path

from engine.errors import EngineError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """Return a local directory holding config.json, safetensors weights and the tokenizer.

    Tried in order: an existing local directory; an embedded model name (see
    `engine.default_model`); a Hub repo id, from the local Hugging Face cache first and then
    by download when the Hub is reachable.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise EngineError(f"{path} is a file; pass the model's directory (holding config.json).")
    from engine import default_model

    if text in default_model.EMBEDDED_MODELS:
        return default_model.ensure_embedded_model(text)
    looks_like_path = not _REPO_ID.fullmatch(text)
    if looks_like_path:
        raise EngineError(
            f"model directory {text!r} does not exist. Pass a directory with config.json and "
            f"*.safetensors, a Hub repo id like 'mistralai/Mixtral-8x7B-Instruct-v0.1', or an "
            f"embedded model name ({', '.join(default_model.EMBEDDED_MODELS)})."
        )
    return _from_hub(text)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    tried = []
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception as e:  # not in the cache
        tried.append(f"the local Hugging Face cache ({type(e).__name__})")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=10))
        except Exception as e:
            tried.append(f"a download from the Hub ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    else:
        tried.append("no download: HF_HUB_OFFLINE is set")
    raise EngineError(
        f"could not find model {repo_id!r}. Tried: {'; '.join(tried)}. Download it where the Hub "
        f"is reachable (`huggingface-cli download {repo_id}`) and pass its local directory."
    )
