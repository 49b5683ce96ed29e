"""Omniglot (Lake, Salakhutdinov and Tenenbaum 2015, Science; MIT license) as few-shot tasks.

Data
----
Zips with the layout ``<top>/<Alphabet>/<character>/<id>_<drawer>.png`` (``<top>/`` may be
absent), 105x105 black-on-white PNGs: the two minimal background sets
``images_background_small1.zip`` / ``images_background_small2.zip`` and equally the full
``images_background.zip`` (30 alphabets) / ``images_evaluation.zip`` (20 alphabets).
:func:`load_omniglot` decodes every image, converts it to grayscale, resizes it to
``image_size x image_size`` with an antialiasing filter (Pillow's LANCZOS by default, or ``box``
= area averaging), inverts it (ink 255, background 0; as Finn et al.'s MAML code, so zero padding
is background) and stores ``uint8``::

    images[c, d, h, w]   character c (a class), drawing d, pixel (h, w)

Characters are sorted by ``(alphabet, character)``; drawings by file name. A character present in
several zips (the minimal sets share Greek and Latin, with the same drawings) is kept once; the
same character with different drawings in two zips is an error. Decoding takes a few seconds;
pass ``cache_dir`` to keep a compressed ``.npz`` keyed by the SHA-256 of the zips' bytes and the
preprocessing options, so a changed zip is never served stale.

Splits by alphabet
------------------
Meta-train, meta-val and meta-test use disjoint alphabets (:func:`split_omniglot`). The default
for the 8 distinct alphabets of the two minimal sets (:data:`MINIMAL_SPLIT`; 5 / 1 / 2, numbers
of characters in brackets)::

    train   Japanese_(katakana) [47], Korean [40], Latin [26], Sanskrit [42], Tagalog [17]  = 172
    val     Greek [24]                                                                       =  24
    test    Balinese [24], Early_Aramaic [22]                                                =  46

The test (and val) alphabets each have >= 20 characters, so the within-alphabet 20-way protocol
(Lake et al.) runs on every one of them; the three largest alphabets stay in meta-train. For other
alphabet sets the default is Lake's: alphabets read from an ``images_evaluation*`` zip are the
test split; the others, sorted by name, go to val at every 5th position (indices 4, 9, ...) and
to train otherwise. Without an evaluation zip, sorted alphabets at index ``i`` go to test when
``i % 5 == 4``, val when ``i % 5 == 3``, train otherwise. Pass explicit alphabet lists to choose.

With ``rotations=True`` every character also appears rotated by 90, 180 and 270 degrees as three
new classes (Santoro et al. 2016; Finn et al. 2017), in every split alike: class
``k = 4 c + r`` is character ``c`` rotated by ``r * 90`` degrees counter-clockwise. For
within-alphabet episodes a rotated alphabet counts as an alphabet of its own (all ``N`` classes
share the alphabet and the rotation).

Episodes
--------
``sample_omniglot_episodes(key, split, T, N, K, Q)``: each task draws ``N`` distinct classes
(uniformly among all classes, or with ``within_alphabet=True`` one alphabet uniformly among
those with >= N classes, then N of its classes), and ``K + Q`` distinct drawings of each class
(support and query are disjoint drawings). Labels ``0..N-1`` follow the random order of the
drawn classes; examples are class-major (class 0's K support images first). Images become
float32 in ``[0, 1]`` with shape ``(T, N K, H, W, 1)`` (NHWC, MLX's convolution layout).
Sampling is NumPy indexing seeded by the MLX key's two words, so the same key gives the same
episodes.

Pooled batches
--------------
``sample_omniglot_batch(key, split, B)``: ``B`` distinct images drawn uniformly from a whole
split, labelled with their *global* class ids ``k`` (as above), for the baseline that pre-trains
one classifier over all meta-train classes pooled: x ``(B, H, W, 1)``, y ``(B,)`` int32.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from metafn._atomic import atomic_write

from metafn.tasks.augment import Augment, random_affine
from metafn.tasks.datadir import default_data_dir
from metafn.tasks.episode import Episode

__all__ = [
    "MINIMAL_ZIPS", "MINIMAL_SPLIT", "OmniglotData", "OmniglotSplits", "default_omniglot_dir",
    "load_omniglot", "split_omniglot", "omniglot_class_alphabets", "sample_omniglot_indices",
    "gather_omniglot_episodes", "sample_omniglot_episodes", "sample_omniglot_episode",
    "sample_omniglot_batch",
]

MINIMAL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")

MINIMAL_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"),
    "val": ("Greek",),
    "test": ("Balinese", "Early_Aramaic"),
}

RESAMPLE = ("lanczos", "box", "bilinear", "bicubic")

_CACHE_FORMAT = "metafn-omniglot-v1"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class OmniglotData(NamedTuple):
    """Omniglot characters in memory (the whole set or one split).

    images: ``(C, D, H, W)`` uint8, ink 255 on background 0 (unless loaded with
      ``invert=False``); ``C`` characters, ``D`` drawings of each.
    alphabet_index: ``(C,)`` int32, the alphabet of each character (index into ``alphabets``).
    alphabets: alphabet names (sorted).
    characters: ``"Alphabet/character"`` of each of the ``C`` characters.
    sources: for each alphabet, the file name of the zip it was read from.
    rotations: 1, or 4 when rotated copies are extra classes (``C * rotations`` classes).
    """

    images: np.ndarray
    alphabet_index: np.ndarray
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]
    sources: tuple[str, ...]
    rotations: int = 1

    @property
    def n_classes(self) -> int:
        """Number of classes: characters times rotations."""
        return int(self.images.shape[0]) * self.rotations

    @property
    def n_drawings(self) -> int:
        """Drawings per character (20 in Omniglot)."""
        return int(self.images.shape[1])


class OmniglotSplits(NamedTuple):
    """Meta-train, meta-val and meta-test characters (disjoint alphabets)."""

    train: OmniglotData
    val: OmniglotData
    test: OmniglotData


# ----------------------------------------------------------------------------- loading


def default_omniglot_dir() -> Path:
    """``$METAFN_OMNIGLOT``, else ``$METAFN_SHARED_DATA/omniglot``, else ``<repo>/../shared/data/omniglot``;
    raises ``FileNotFoundError`` if none exists."""
    return default_data_dir("omniglot", "METAFN_OMNIGLOT", "Pass paths= (zip files or a directory of them) or set METAFN_OMNIGLOT.")


def _resolve_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    if paths is None:
        root = default_omniglot_dir()
        found = [root / n for n in MINIMAL_ZIPS if (root / n).is_file()]
        if not found:
            raise FileNotFoundError(f"paths: no {' or '.join(MINIMAL_ZIPS)} in {str(root)!r}")
        return found
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("paths: expected at least one Omniglot zip file")
    out: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"paths: expected file paths, got {type(item).__name__} {item!r}")
        p = Path(item)
        if p.is_dir():
            zips = sorted(p.glob("*.zip"))
            if not zips:
                raise FileNotFoundError(f"paths: directory {str(p)!r} holds no .zip file")
            out += zips
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"paths: Omniglot zip {str(p)!r} does not exist")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{str(path)!r}: not a readable zip file (corrupt or truncated?): {e}") from e


def _list_characters(path: Path, zf: zipfile.ZipFile) -> dict[tuple[str, str], list[zipfile.ZipInfo]]:
    """``{(alphabet, character): [png members sorted by name]}`` for one zip."""
    chars: dict[tuple[str, str], list[zipfile.ZipInfo]] = {}
    depth = None
    for info in zf.infolist():
        name = info.filename
        if info.is_dir():
            continue
        parts = name.split("/")
        if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
            continue  # macOS resource forks, .DS_Store and other hidden files
        if not name.lower().endswith(".png"):
            raise ValueError(
                f"{str(path)!r}: member {name!r} is not a PNG image; an Omniglot zip holds only "
                f"<top>/<Alphabet>/<character>/<id>_<drawer>.png files"
            )
        if len(parts) not in (3, 4) or (depth is not None and len(parts) != depth):
            raise ValueError(
                f"{str(path)!r}: member {name!r} does not follow the layout "
                f"<top>/<Alphabet>/<character>/<id>_<drawer>.png"
            )
        depth = len(parts)
        chars.setdefault((parts[-3], parts[-2]), []).append(info)
    if not chars:
        raise ValueError(f"{str(path)!r}: no PNG images found (expected "
                         f"<top>/<Alphabet>/<character>/<id>_<drawer>.png)")
    for members in chars.values():
        members.sort(key=lambda i: i.filename)
    return chars


def _decode(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, image_size: int | None,
            resample: str, invert: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    where = f"{str(path)!r}: member {info.filename!r}"
    try:
        raw = zf.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise ValueError(f"{where}: cannot be read (corrupt zip?): {e}") from e
    if not raw.startswith(_PNG_MAGIC):
        raise ValueError(f"{where}: not a PNG image (bad signature)")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("L")
            if image_size is not None and im.size != (image_size, image_size):
                filters = {
                    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
                    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                }
                im = im.resize((image_size, image_size), resample=filters[resample])
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: cannot decode the PNG image: {e}") from e
    return 255 - arr if invert else arr.copy()


def _build(paths: list[Path], image_size: int | None, resample: str, invert: bool) -> OmniglotData:
    try:
        import PIL  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_omniglot needs Pillow to decode PNG images: pip install Pillow") from e
    owner: dict[tuple[str, str], tuple[Path, list[tuple[str, int]]]] = {}
    todo: list[tuple[Path, list[zipfile.ZipInfo], tuple[str, str]]] = []
    source_of: dict[str, str] = {}
    zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for path in paths:
            zf = zips[path] = _open_zip(path)
            for key, members in _list_characters(path, zf).items():
                signature = [(m.filename.rsplit("/", 1)[-1], m.CRC) for m in members]
                if key in owner:
                    first, sig = owner[key]
                    if sig != signature:
                        raise ValueError(
                            f"character {key[0]}/{key[1]} is in {str(first)!r} and in "
                            f"{str(path)!r} with different drawings; pass only one of the two zips"
                        )
                    continue  # the same character again (minimal sets share Greek and Latin)
                owner[key] = (path, signature)
                source_of.setdefault(key[0], path.name)
                todo.append((path, members, key))
        todo.sort(key=lambda t: t[2])
        counts = {len(m) for _, m, _ in todo}
        if len(counts) != 1:
            want = max(counts, key=lambda c: sum(len(m) == c for _, m, _ in todo))
            path, members, key = next(t for t in todo if len(t[1]) != want)
            raise ValueError(
                f"{str(path)!r}: character {key[0]}/{key[1]} has {len(members)} drawings, "
                f"others have {want}; every character needs the same number"
            )
        images = []
        for path, members, _ in todo:
            images.append(np.stack([
                _decode(path, zips[path], m, image_size, resample, invert) for m in members
            ]))
    finally:
        for zf in zips.values():
            zf.close()
    shapes = {im.shape[1:] for im in images}
    if len(shapes) != 1:
        raise ValueError(f"paths: images have different sizes {sorted(shapes)}; pass image_size")
    alphabets = tuple(sorted(source_of))
    index = {a: i for i, a in enumerate(alphabets)}
    return OmniglotData(
        images=np.stack(images),
        alphabet_index=np.array([index[k[0]] for _, _, k in todo], dtype=np.int32),
        alphabets=alphabets,
        characters=tuple(f"{k[0]}/{k[1]}" for _, _, k in todo),
        sources=tuple(source_of[a] for a in alphabets),
    )


def _cache_key(paths: list[Path], image_size: int | None, resample: str, invert: bool) -> str:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for digest in sorted(_sha256(p) + p.name for p in paths):
        h.update(digest.encode())
    h.update(repr((image_size, resample, invert)).encode())
    return h.hexdigest()[:24]


def _read_cache(file: Path) -> OmniglotData | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            return OmniglotData(
                images=z["images"].astype(np.uint8),
                alphabet_index=z["alphabet_index"].astype(np.int32),
                alphabets=tuple(str(s) for s in z["alphabets"]),
                characters=tuple(str(s) for s in z["characters"]),
                sources=tuple(str(s) for s in z["sources"]),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable or partial cache file: rebuild it


def _write_cache(file: Path, data: OmniglotData) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, images=data.images, alphabet_index=data.alphabet_index,
                alphabets=np.array(data.alphabets, dtype=np.str_),
                characters=np.array(data.characters, dtype=np.str_),
                sources=np.array(data.sources, dtype=np.str_),
            )

    atomic_write(file, write)


def load_omniglot(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = 28,
    resample: str = "lanczos",
    invert: bool = True,
) -> OmniglotData:
    """Read Omniglot zips into an :class:`OmniglotData` (see the module docstring).

    paths: zip files, or directories whose ``*.zip`` files are all read; ``None`` reads the two
      minimal background zips from :func:`default_omniglot_dir`.
    cache_dir: where to keep ``omniglot_<key>.npz`` (``key`` = SHA-256 of the zips' bytes and
      the options below); ``None`` decodes every time.
    image_size: side of the square output images (``None`` keeps the original 105x105).
    resample: antialiasing filter, one of ``lanczos`` (default), ``box`` (area average),
      ``bilinear``, ``bicubic`` (Pillow's, all with antialiasing on downscaling).
    invert: ``True`` stores ink as 255 on a 0 background.

    Raises ``FileNotFoundError`` for a missing zip and ``ValueError`` naming the zip (and member)
    for a corrupt zip, a non-PNG file, an undecodable image or a layout violation.
    """
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample: expected one of {RESAMPLE}, got {resample!r}")
    files = _resolve_paths(paths)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"omniglot_{_cache_key(files, image_size, resample, invert)}.npz"
        if cache_file.is_file():
            cached = _read_cache(cache_file)
            if cached is not None:
                return cached
    data = _build(files, image_size, resample, invert)
    if cache_file is not None:
        _write_cache(cache_file, data)
    return data


# ----------------------------------------------------------------------------- splits


def _default_split(data: OmniglotData) -> dict[str, tuple[str, ...]]:
    if set(data.alphabets) == {a for names in MINIMAL_SPLIT.values() for a in names}:
        return dict(MINIMAL_SPLIT)
    evaluation = [a for a, s in zip(data.alphabets, data.sources) if s.startswith("images_evaluation")]
    rest = sorted(a for a in data.alphabets if a not in evaluation)
    if evaluation and rest:
        return {
            "train": tuple(a for i, a in enumerate(rest) if i % 5 != 4),
            "val": tuple(a for i, a in enumerate(rest) if i % 5 == 4),
            "test": tuple(sorted(evaluation)),
        }
    names = sorted(data.alphabets)
    return {
        "train": tuple(a for i, a in enumerate(names) if i % 5 < 3),
        "val": tuple(a for i, a in enumerate(names) if i % 5 == 3),
        "test": tuple(a for i, a in enumerate(names) if i % 5 == 4),
    }


def _subset(data: OmniglotData, alphabets: tuple[str, ...], rotations: int) -> OmniglotData:
    keep_ids = [data.alphabets.index(a) for a in sorted(alphabets)]
    mask = np.isin(data.alphabet_index, np.array(keep_ids, dtype=np.int32))
    remap = np.full(len(data.alphabets), -1, dtype=np.int32)
    remap[keep_ids] = np.arange(len(keep_ids), dtype=np.int32)
    chars = np.nonzero(mask)[0]
    return OmniglotData(
        images=data.images[chars],
        alphabet_index=remap[data.alphabet_index[chars]],
        alphabets=tuple(data.alphabets[i] for i in keep_ids),
        characters=tuple(data.characters[i] for i in chars),
        sources=tuple(data.sources[i] for i in keep_ids),
        rotations=rotations,
    )


def split_omniglot(
    data: OmniglotData,
    train: Sequence[str] | None = None,
    val: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    rotations: bool = False,
    train_on_val: bool = False,
) -> OmniglotSplits:
    """Split ``data`` by alphabet into meta-train / meta-val / meta-test.

    ``train_on_val=True`` is the final fit after hyperparameters were chosen on validation
    (Snell et al. 2017): meta-train holds the train *and* val alphabets, val is returned as well
    (for monitoring only: it is no longer held out), test is unchanged.

    A list not given (``None``) is the default split's of the module docstring
    (:data:`MINIMAL_SPLIT` for the minimal sets), so ``test=["Balinese"]`` alone scores one
    alphabet with the default train and val. ``val`` may be empty; an alphabet may not be in two
    lists, and alphabets in none are left out. ``rotations=True`` adds the 90/180/270-degree
    rotations of every character as new classes in all three splits.
    """
    if not isinstance(data, OmniglotData):
        raise TypeError(f"data: expected OmniglotData (load_omniglot), got {type(data).__name__}")
    default = _default_split(data)
    given = {"train": train, "val": val, "test": test}
    spec = {}
    for name, g in given.items():
        if isinstance(g, str):
            raise TypeError(f"{name}: expected a list of alphabet names, got the string {g!r}")
        spec[name] = tuple(default[name] if g is None else g)
    seen: dict[str, str] = {}
    for name, alphabets in spec.items():
        for a in alphabets:
            if a not in data.alphabets:
                raise ValueError(f"{name}: unknown alphabet {a!r}; known: {', '.join(data.alphabets)}")
            if a in seen:
                where = seen[a] + (" (by default; give that list too)" if given[seen[a]] is None else "")
                raise ValueError(f"{name}: alphabet {a!r} is already in the {where} split; "
                                 f"splits must use disjoint alphabets")
            seen[a] = name
    if rotations and data.images.shape[-1] != data.images.shape[-2]:
        raise ValueError(f"rotations: 90-degree rotations need square images, got "
                         f"{data.images.shape[-2:]}; load with image_size=...")
    r = 4 if rotations else 1
    if train_on_val:
        spec["train"] = tuple(spec["train"]) + tuple(spec["val"])
    return OmniglotSplits(*(_subset(data, spec[n], r) for n in ("train", "val", "test")))


# ----------------------------------------------------------------------------- episodes


def omniglot_class_alphabets(data: OmniglotData) -> np.ndarray:
    """``(n_classes,)`` int32 alphabet group of each class: ``alphabet_index * rotations + r``
    (a rotated alphabet is its own group for within-alphabet episodes)."""
    r = data.rotations
    return (np.repeat(data.alphabet_index.astype(np.int32), r) * r
            + np.tile(np.arange(r, dtype=np.int32), data.images.shape[0]))


def _rng(key: mx.array) -> np.random.Generator:
    if not isinstance(key, mx.array) or key.shape != (2,) or key.dtype != mx.uint32:
        raise TypeError(f"key: expected an MLX PRNG key (uint32, shape (2,)), got "
                        f"{getattr(key, 'dtype', type(key).__name__)} {getattr(key, 'shape', '')}")
    return np.random.default_rng([int(x) for x in np.array(key)])


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def sample_omniglot_indices(
    key: mx.array,
    data: OmniglotData,
    n_tasks: int,
    n_way: int,
    n_drawings: int,
    within_alphabet: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the classes and drawings of ``n_tasks`` episodes.

    Returns ``classes (T, N)`` int64 class ids (distinct within a task; class ``k`` is character
    ``k // rotations`` rotated by ``(k % rotations) * 90`` degrees) and ``drawings (T, N, n_drawings)``
    int64 distinct drawing indices per class.
    """
    if not isinstance(data, OmniglotData):
        raise TypeError(f"data: expected OmniglotData (load_omniglot / split_omniglot), got "
                        f"{type(data).__name__}")
    _positive("n_tasks", n_tasks)
    _positive("n_way", n_way)
    _positive("k_shot + n_query", n_drawings)
    if n_drawings > data.n_drawings:
        raise ValueError(f"k_shot + n_query: {n_drawings} exceeds the {data.n_drawings} drawings "
                         f"per class")
    rng = _rng(key)
    n_classes = data.n_classes
    if within_alphabet:
        groups = omniglot_class_alphabets(data)
        sizes = np.bincount(groups, minlength=len(data.alphabets) * data.rotations)
        eligible = np.nonzero(sizes >= n_way)[0]
        if eligible.size == 0:
            raise ValueError(f"n_way: {n_way} exceeds the classes of every alphabet (largest has "
                             f"{int(sizes.max()) if sizes.size else 0}); within_alphabet needs one "
                             f"with >= n_way characters")
        members = {int(g): np.nonzero(groups == g)[0] for g in eligible}
        chosen = rng.choice(eligible, size=n_tasks)
        classes = np.stack([rng.choice(members[int(g)], size=n_way, replace=False) for g in chosen])
    else:
        if n_way > n_classes:
            raise ValueError(f"n_way: {n_way} exceeds the {n_classes} classes available")
        classes = np.argsort(rng.random((n_tasks, n_classes)), axis=1)[:, :n_way]
    drawings = np.argsort(rng.random((n_tasks, n_way, data.n_drawings)), axis=2)[..., :n_drawings]
    return classes.astype(np.int64), drawings.astype(np.int64)


def _class_images(data: OmniglotData, classes: np.ndarray, drawings: np.ndarray) -> np.ndarray:
    """float32 images in [0, 1] of ``classes`` (ids ``k = rotations * c + r``) and ``drawings``
    (integer arrays broadcasting to a common shape ``S``): ``(*S, H, W)``, character ``c``'s
    drawing rotated by ``r * 90`` degrees counter-clockwise."""
    r = data.rotations
    classes, drawings = np.broadcast_arrays(classes, drawings)
    rots = classes % r
    x = data.images[classes // r, drawings]
    for k in range(1, r):
        sel = rots == k
        if sel.any():
            x[sel] = np.rot90(x[sel], k, axes=(-2, -1))
    return x.astype(np.float32) * np.float32(1.0 / 255.0)


def gather_omniglot_episodes(
    data: OmniglotData, classes: np.ndarray, drawings: np.ndarray, k_shot: int,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Episode:
    """Build the episodes of :func:`sample_omniglot_indices`' ``(classes, drawings)``.

    The first ``k_shot`` drawings of each class are support, the rest query. ``transform``, if
    given, maps the float images ``(T, N, K+Q, H, W)`` before they are split (augmentation).
    Returns x
    ``(T, N K, H, W, 1)`` / ``(T, N Q, H, W, 1)`` float32 in [0, 1] and int32 labels
    ``y[t, n K + j] = n``.
    """
    t, n, m = drawings.shape
    if classes.shape != (t, n):
        raise ValueError(f"classes: expected shape {(t, n)} (drawings without the last axis), got "
                         f"{classes.shape}")
    if not 1 <= k_shot < m:
        raise ValueError(f"k_shot: expected 1 <= k_shot < {m} (drawings per class), got {k_shot}")
    x = _class_images(data, classes[..., None], drawings)  # (T, N, K+Q, H, W)
    if transform is not None:
        x = transform(x)
    h, w = x.shape[-2:]
    q = m - k_shot
    labels = np.arange(n, dtype=np.int32)
    return Episode(
        support_x=mx.array(x[:, :, :k_shot].reshape(t, n * k_shot, h, w, 1)),
        support_y=mx.array(np.broadcast_to(np.repeat(labels, k_shot), (t, n * k_shot))),
        query_x=mx.array(x[:, :, k_shot:].reshape(t, n * q, h, w, 1)),
        query_y=mx.array(np.broadcast_to(np.repeat(labels, q), (t, n * q))),
    )


def sample_omniglot_episodes(
    key: mx.array,
    data: OmniglotData,
    n_tasks: int,
    n_way: int,
    k_shot: int,
    n_query: int,
    within_alphabet: bool = False,
    augment: Augment | None = None,
) -> Episode:
    """``n_tasks`` N-way K-shot episodes with ``n_query`` queries per class.

    support_x ``(T, N K, H, W, 1)`` float32, support_y ``(T, N K)`` int32 in ``0..N-1``;
    query_x ``(T, N Q, H, W, 1)``, query_y ``(T, N Q)``. ``within_alphabet=True`` draws every
    task's classes from one alphabet with >= N classes. ``augment`` (meta-training only) warps
    every image by its own random affine transform (:mod:`metafn.tasks.augment`); the key is
    then split into one for the episode and one for the transforms, so the same key still gives
    the same episode. Errors: ``n_way`` above the classes available, ``k_shot + n_query`` above
    the drawings per class, a negative augmentation range.
    """
    _positive("k_shot", k_shot)
    _positive("n_query", n_query)
    key, transform = _augmenter(key, augment)
    classes, drawings = sample_omniglot_indices(key, data, n_tasks, n_way, k_shot + n_query,
                                                within_alphabet)
    return gather_omniglot_episodes(data, classes, drawings, k_shot, transform)


def _augmenter(key: mx.array, augment: Augment | None
               ) -> tuple[mx.array, Callable[[np.ndarray], np.ndarray] | None]:
    """``(key, None)`` without augmentation, else ``(sampling key, image transform)`` from a
    split of ``key``."""
    if augment is None or not augment.check().active:
        return key, None
    _rng(key)  # the key's own error before it is split
    sample_key, warp_key = mx.random.split(key)
    return sample_key, lambda x: random_affine(_rng(warp_key), x, augment)


def sample_omniglot_episode(
    key: mx.array,
    data: OmniglotData,
    n_way: int,
    k_shot: int,
    n_query: int,
    within_alphabet: bool = False,
) -> Episode:
    """One episode (no task axis): x ``(N K, H, W, 1)``, y ``(N K,)``; equals task 0 of
    ``sample_omniglot_episodes(key, data, 1, ...)``."""
    ep = sample_omniglot_episodes(key, data, 1, n_way, k_shot, n_query, within_alphabet)
    return Episode(*(v[0] for v in ep))


def sample_omniglot_batch(key: mx.array, data: OmniglotData, batch_size: int,
                          augment: Augment | None = None) -> tuple[mx.array, mx.array]:
    """A minibatch of images with *global* class labels, for pooled supervised pre-training.

    Draws ``batch_size`` distinct ``(class, drawing)`` pairs uniformly among all
    ``n_classes * n_drawings`` images of ``data`` (one split). Returns x ``(B, H, W, 1)``
    float32 in [0, 1] and y ``(B,)`` int32 with ``y[i] = k``, the class id of image ``i``:
    ``k = rotations * c + r`` for character ``c`` rotated by ``r * 90`` degrees, the numbering
    of :func:`sample_omniglot_indices` (so label ``k`` always means the same class, unlike an
    episode's per-task labels ``0..N-1``). The same key gives the same batch. ``augment`` warps
    the images as in :func:`sample_omniglot_episodes`.
    """
    if not isinstance(data, OmniglotData):
        raise TypeError(f"data: expected OmniglotData (load_omniglot / split_omniglot), got "
                        f"{type(data).__name__}")
    _positive("batch_size", batch_size)
    key, transform = _augmenter(key, augment)
    total = data.n_classes * data.n_drawings
    if batch_size > total:
        raise ValueError(f"batch_size: {batch_size} exceeds the {total} images of the split "
                         f"({data.n_classes} classes x {data.n_drawings} drawings)")
    flat = _rng(key).choice(total, size=batch_size, replace=False)
    classes, drawings = flat // data.n_drawings, flat % data.n_drawings
    x = _class_images(data, classes, drawings)
    if transform is not None:
        x = transform(x)
    return mx.array(x[..., None]), mx.array(classes.astype(np.int32))
