"""Omniglot loader, alphabet splits and episode sampling (metafn.tasks.omniglot)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metafn.tasks import Episode
from metafn.tasks import omniglot as om
from metafn.tasks.omniglot import (
    MINIMAL_SPLIT, OmniglotData, gather_omniglot_episodes, load_omniglot, omniglot_class_alphabets,
    sample_omniglot_episode, sample_omniglot_episodes, sample_omniglot_indices, split_omniglot,
)

Image = pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------------------- tiny zips


def _png(seed: int, size: int = 20) -> bytes:
    """A random black-on-white 1-bit PNG (Omniglot's format)."""
    rng = np.random.default_rng(seed)
    pixels = np.where(rng.random((size, size)) < 0.2, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _layout(alphabets: dict[str, int], drawings: int = 4, seed: int = 0) -> dict[str, bytes]:
    """``{"Alphabet/characterNN/<id>_<drawer>.png": bytes}``; content depends on the names."""
    files = {}
    for a, n_chars in alphabets.items():
        for c in range(1, n_chars + 1):
            for d in range(1, drawings + 1):
                s = seed + sum(map(ord, a)) * 1000 + c * 50 + d
                files[f"{a}/character{c:02d}/{c:04d}_{d:02d}.png"] = _png(s)
    return files


def _write_zip(path: Path, files: dict[str, bytes], top: str | None = "images_test",
               compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in files.items():
            z.writestr(f"{top}/{name}" if top else name, data)
    return path


@pytest.fixture
def tiny_zip(tmp_path: Path) -> Path:
    return _write_zip(tmp_path / "small1.zip", _layout({"Beta": 2, "Alpha": 3}))


# ----------------------------------------------------------------------------- loader


def test_loader_layout_resize_and_inversion(tiny_zip: Path):
    data = load_omniglot(tiny_zip, image_size=8)
    assert data.images.shape == (5, 4, 8, 8) and data.images.dtype == np.uint8
    assert data.alphabets == ("Alpha", "Beta")
    assert data.characters == tuple(
        [f"Alpha/character{c:02d}" for c in (1, 2, 3)] + [f"Beta/character{c:02d}" for c in (1, 2)]
    )
    assert data.alphabet_index.tolist() == [0, 0, 0, 1, 1]
    assert data.sources == ("small1.zip", "small1.zip")
    assert data.n_classes == 5 and data.n_drawings == 4 and data.rotations == 1
    # Pixel-exact against Pillow's antialiased LANCZOS resize, then inversion (ink = 255).
    raw = _layout({"Beta": 2, "Alpha": 3})["Beta/character02/0002_03.png"]
    im = Image.open(io.BytesIO(raw)).convert("L").resize((8, 8), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(data.images[4, 2], 255 - np.asarray(im))
    box = load_omniglot(tiny_zip, image_size=8, resample="box", invert=False)
    im = Image.open(io.BytesIO(raw)).convert("L").resize((8, 8), Image.Resampling.BOX)
    np.testing.assert_array_equal(box.images[4, 2], np.asarray(im))
    full = load_omniglot(tiny_zip, image_size=None)
    assert full.images.shape == (5, 4, 20, 20)
    assert set(np.unique(full.images)) <= {0, 255}


def test_loader_accepts_zip_without_top_directory(tmp_path: Path):
    path = _write_zip(tmp_path / "flat.zip", _layout({"Alpha": 2}), top=None)
    assert load_omniglot(path, image_size=8).characters == ("Alpha/character01", "Alpha/character02")


def test_duplicate_alphabets_counted_once(tmp_path: Path):
    shared = _layout({"Greek": 2, "Latin": 3})
    one = _write_zip(tmp_path / "s1.zip", {**shared, **_layout({"Korean": 2})}, top="images_s1")
    two = _write_zip(tmp_path / "s2.zip", {**shared, **_layout({"Tagalog": 1})}, top="images_s2")
    data = load_omniglot([one, two], image_size=8)
    assert data.alphabets == ("Greek", "Korean", "Latin", "Tagalog")
    assert len(data.characters) == 2 + 2 + 3 + 1 == len(set(data.characters))
    assert np.bincount(data.alphabet_index).tolist() == [2, 2, 3, 1]
    # Same character with different drawings in two zips: an error naming both zips.
    changed = dict(shared)
    changed["Greek/character01/0001_01.png"] = _png(999)
    three = _write_zip(tmp_path / "s3.zip", changed)
    with pytest.raises(ValueError, match=r"Greek/character01.*s1\.zip.*s3\.zip.*different drawings"):
        load_omniglot([one, three], image_size=8)


def test_non_png_member_is_named(tmp_path: Path):
    files = _layout({"Alpha": 2})
    files["Alpha/character01/notes.txt"] = b"hello"
    path = _write_zip(tmp_path / "bad.zip", files)
    with pytest.raises(ValueError, match=r"bad\.zip.*Alpha/character01/notes\.txt.*not a PNG"):
        load_omniglot(path)
    files = _layout({"Alpha": 2})
    buf = io.BytesIO()
    Image.new("L", (20, 20)).save(buf, format="JPEG")
    files["Alpha/character02/0002_01.png"] = buf.getvalue()  # a JPEG named .png
    path = _write_zip(tmp_path / "jpeg.zip", files)
    with pytest.raises(ValueError, match=r"jpeg\.zip.*character02/0002_01\.png.*not a PNG"):
        load_omniglot(path)
    files = _layout({"Alpha": 2})
    files["Alpha/character02/0002_01.png"] = _png(1)[:40]  # truncated PNG
    path = _write_zip(tmp_path / "trunc.zip", files)
    with pytest.raises(ValueError, match=r"trunc\.zip.*character02/0002_01\.png.*decode"):
        load_omniglot(path)
    # Hidden files and macOS resource forks are ignored.
    files = _layout({"Alpha": 2})
    files[".DS_Store"] = b"junk"
    files["Alpha/.DS_Store"] = b"junk"
    path = _write_zip(tmp_path / "mac.zip", files)
    assert load_omniglot(path, image_size=8).images.shape == (2, 4, 8, 8)


def test_corrupt_and_missing_zip(tmp_path: Path, tiny_zip: Path):
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        load_omniglot(tmp_path / "nope.zip")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(ValueError, match=r"junk\.zip.*not a readable zip"):
        load_omniglot(junk)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(tiny_zip.read_bytes()[:-300])
    with pytest.raises(ValueError, match=r"truncated\.zip"):
        load_omniglot(truncated)
    # A flipped byte inside a stored member: the CRC check fails; the member is named.
    stored = _write_zip(tmp_path / "crc.zip", _layout({"Alpha": 1}), compression=zipfile.ZIP_STORED)
    blob = bytearray(stored.read_bytes())
    with zipfile.ZipFile(stored) as z:
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    blob[start + 20] ^= 0xFF
    stored.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"crc\.zip.*" + info.filename.replace(".", r"\.")):
        load_omniglot(stored)


def test_uneven_drawings_rejected(tmp_path: Path):
    files = _layout({"Alpha": 3})
    del files["Alpha/character02/0002_04.png"]
    with pytest.raises(ValueError, match="Alpha/character02 has 3 drawings"):
        load_omniglot(_write_zip(tmp_path / "uneven.zip", files))


def test_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    path = _write_zip(tmp_path / "data.zip", _layout({"Alpha": 2}))
    first = load_omniglot(path, cache_dir=cache, image_size=8)
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although a valid cache exists")

    with monkeypatch.context() as m:
        m.setattr(om, "_build", no_decoding)
        again = load_omniglot(path, cache_dir=cache, image_size=8)
    for a, b in zip(first, again):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    # Another resize option is another cache entry.
    assert load_omniglot(path, cache_dir=cache, image_size=10).images.shape[-1] == 10
    assert len(list(cache.glob("*.npz"))) == 2
    # Same file name, new content: never served stale.
    layout = _layout({"Alpha": 2})
    layout["Alpha/character01/0001_01.png"] = _png(12345)
    _write_zip(path, layout)
    changed = load_omniglot(path, cache_dir=cache, image_size=8)
    assert not np.array_equal(changed.images[0, 0], first.images[0, 0])
    np.testing.assert_array_equal(changed.images[1], first.images[1])
    assert len(list(cache.glob("*.npz"))) == 3
    # A damaged cache file is rebuilt, not trusted.
    for f in cache.glob("*.npz"):
        f.write_bytes(b"garbage")
    np.testing.assert_array_equal(load_omniglot(path, cache_dir=cache, image_size=8).images,
                                  changed.images)


def test_loader_argument_errors(tiny_zip: Path):
    with pytest.raises(ValueError, match="resample"):
        load_omniglot(tiny_zip, resample="nearest-ish")
    with pytest.raises(ValueError, match="image_size"):
        load_omniglot(tiny_zip, image_size=0)
    with pytest.raises(ValueError, match="paths"):
        load_omniglot([])


# ----------------------------------------------------------------------------- splits


def _synthetic(alphabet_sizes: list[int], drawings: int = 20, size: int = 6,
               rotations: int = 1) -> OmniglotData:
    """In-memory data whose pixel (0, 0) codes the character, pixel (0, 1) the drawing."""
    n = sum(alphabet_sizes)
    images = np.zeros((n, drawings, size, size), dtype=np.uint8)
    images[:, :, 0, 0] = np.arange(n)[:, None]
    images[:, :, 0, 1] = np.arange(drawings)[None, :]
    names = tuple(f"A{i}" for i in range(len(alphabet_sizes)))
    index = np.repeat(np.arange(len(alphabet_sizes), dtype=np.int32), alphabet_sizes)
    chars = tuple(f"{names[a]}/character{c:02d}" for a, c in
                  zip(index, [c for s in alphabet_sizes for c in range(1, s + 1)]))
    return OmniglotData(images, index, names, chars, tuple("synthetic.zip" for _ in names), rotations)


def test_split_by_alphabet_explicit_and_errors():
    data = _synthetic([3, 4, 5, 6])
    s = split_omniglot(data, train=["A0", "A3"], val=[], test=["A2"])
    assert s.train.alphabets == ("A0", "A3") and s.val.alphabets == () and s.test.alphabets == ("A2",)
    assert s.train.images.shape[0] == 9 and s.val.images.shape[0] == 0
    assert s.test.alphabet_index.tolist() == [0] * 5
    assert s.train.alphabet_index.tolist() == [0] * 3 + [1] * 6
    assert set(s.train.characters).isdisjoint(s.test.characters)
    with pytest.raises(ValueError, match="'A0' is already in the train split"):
        split_omniglot(data, train=["A0"], val=["A0"], test=["A1"])
    with pytest.raises(ValueError, match="unknown alphabet 'Klingon'"):
        split_omniglot(data, train=["Klingon"], val=[], test=[])
    # A list not given is the default split's (generic default for 4 alphabets: train A0-A2, val A3).
    p = split_omniglot(data, train=["A0"], test=["A1"])
    assert p.train.alphabets == ("A0",) and p.val.alphabets == ("A3",) and p.test.alphabets == ("A1",)
    with pytest.raises(ValueError, match=r"test: alphabet 'A1' is already in the train \(by default"):
        split_omniglot(data, test=["A1"])
    # Generic default: sorted alphabets, index % 5 == 4 -> test, == 3 -> val.
    d = split_omniglot(_synthetic([2] * 10))
    assert d.test.alphabets == ("A4", "A9") and d.val.alphabets == ("A3", "A8")
    assert len(d.train.alphabets) == 6


def test_rotations_are_new_classes_in_every_split():
    data = _synthetic([2, 3, 2])
    s = split_omniglot(data, train=["A0", "A1"], val=[], test=["A2"], rotations=True)
    assert s.train.n_classes == 20 and s.test.n_classes == 8 and s.val.n_classes == 0
    classes = np.array([[5, 6]])  # character 1 at 90 degrees, character 1 at 180 degrees
    drawings = np.array([[[3, 4], [3, 4]]])
    ep = gather_omniglot_episodes(s.train, classes, drawings, k_shot=1)
    base = s.train.images[1, 3].astype(np.float32) / 255
    np.testing.assert_allclose(np.array(ep.support_x[0, 0, ..., 0]), np.rot90(base, 1))
    np.testing.assert_allclose(np.array(ep.support_x[0, 1, ..., 0]), np.rot90(base, 2))
    groups = omniglot_class_alphabets(s.train)
    assert groups[:8].tolist() == [0, 1, 2, 3] * 2 and groups[8:12].tolist() == [4, 5, 6, 7]


def test_default_minimal_split(omniglot_minimal: OmniglotData):
    data = omniglot_minimal
    assert len(data.alphabets) == 8 and len(data.characters) == 242
    s = split_omniglot(data)
    assert s.train.alphabets == tuple(sorted(MINIMAL_SPLIT["train"]))
    assert s.val.alphabets == ("Greek",) and s.test.alphabets == ("Balinese", "Early_Aramaic")
    assert [len(x.characters) for x in s] == [172, 24, 46]
    seen = [set(x.alphabets) for x in s]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for part in (s.val, s.test):
        assert np.bincount(part.alphabet_index).min() >= 20  # within-alphabet 20-way
    for part in s:
        assert all(c.split("/")[0] in part.alphabets for c in part.characters)


# ----------------------------------------------------------------------------- episodes


@pytest.fixture(scope="module")
def omniglot_minimal(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> OmniglotData:
    root = shared_data / "omniglot"
    return load_omniglot([root / n for n in om.MINIMAL_ZIPS],
                         cache_dir=tmp_path_factory.mktemp("omniglot_cache"))


def _check_episode(ep: Episode, t: int, n: int, k: int, q: int, size: int) -> None:
    assert ep.support_x.shape == (t, n * k, size, size, 1) and ep.support_x.dtype == mx.float32
    assert ep.query_x.shape == (t, n * q, size, size, 1)
    assert ep.support_y.dtype == mx.int32 and ep.query_y.dtype == mx.int32
    sy, qy = np.array(ep.support_y), np.array(ep.query_y)
    for row in sy:
        assert np.bincount(row, minlength=n).tolist() == [k] * n
    for row in qy:
        assert np.bincount(row, minlength=n).tolist() == [q] * n
    x = np.array(ep.support_x)
    assert x.min() >= 0.0 and x.max() <= 1.0


@given(
    seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), k=st.integers(1, 4),
    q=st.integers(1, 4), within=st.booleans(), rot=st.booleans(),
)
def test_episode_invariants(seed: int, n: int, k: int, q: int, within: bool, rot: bool):
    data = split_omniglot(_synthetic([5, 3, 7], drawings=8), train=["A0", "A1", "A2"], val=[],
                          test=[], rotations=rot).train
    key = mx.random.key(seed)
    classes, drawings = sample_omniglot_indices(key, data, 3, n, k + q, within)
    assert classes.shape == (3, n) and drawings.shape == (3, n, k + q)
    for t in range(3):
        assert len(set(classes[t].tolist())) == n
        for c in range(n):
            assert len(set(drawings[t, c].tolist())) == k + q  # support / query disjoint
        if within:
            assert len(set(omniglot_class_alphabets(data)[classes[t]].tolist())) == 1
    ep = sample_omniglot_episodes(key, data, 3, n, k, q, within)
    _check_episode(ep, 3, n, k, q, 6)
    again = sample_omniglot_episodes(key, data, 3, n, k, q, within)
    for a, b in zip(ep, again):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    # Without rotations, pixel (0, 0) / (0, 1) identify character and drawing: each support
    # image's (character, drawing) pair appears in no query image, and labels follow classes.
    if not rot:
        sx, qx = np.array(ep.support_x)[..., 0], np.array(ep.query_x)[..., 0]
        sids = np.rint(sx[:, :, 0, :2] * 255).astype(int)
        qids = np.rint(qx[:, :, 0, :2] * 255).astype(int)
        for t in range(3):
            s_pairs = {tuple(p) for p in sids[t]}
            assert s_pairs.isdisjoint({tuple(p) for p in qids[t]})
            assert sids[t, :, 0].tolist() == np.repeat(classes[t], k).tolist()


def test_episodes_on_real_data(omniglot_minimal: OmniglotData):
    s = split_omniglot(omniglot_minimal, rotations=True)
    ep = sample_omniglot_episodes(mx.random.key(7), s.train, 4, 5, 1, 15)
    _check_episode(ep, 4, 5, 1, 15, 28)
    other = sample_omniglot_episodes(mx.random.key(8), s.train, 4, 5, 1, 15)
    assert not np.array_equal(np.array(ep.support_x), np.array(other.support_x))
    one = sample_omniglot_episode(mx.random.key(7), s.test, 20, 1, 5, within_alphabet=True)
    assert one.support_x.shape == (20, 28, 28, 1) and one.query_y.shape == (100,)
    classes, _ = sample_omniglot_indices(mx.random.key(3), s.test, 16, 20, 2, within_alphabet=True)
    groups = omniglot_class_alphabets(s.test)
    assert all(len(set(groups[row].tolist())) == 1 for row in classes)
    assert len({int(groups[row[0]]) for row in classes}) > 1  # several alphabets are drawn
    # Background is 0 and strokes are 1 after inversion; the images are mostly background.
    assert 0.02 < float(mx.mean(ep.support_x)) < 0.3


def test_episode_errors():
    data = _synthetic([5, 3], drawings=20)
    with pytest.raises(ValueError, match="n_way: 9 exceeds the 8 classes"):
        sample_omniglot_episodes(mx.random.key(0), data, 2, 9, 1, 1)
    with pytest.raises(ValueError, match=r"k_shot \+ n_query: 21 exceeds the 20 drawings"):
        sample_omniglot_episodes(mx.random.key(0), data, 2, 5, 1, 20)
    with pytest.raises(ValueError, match="n_way: 6 exceeds the classes of every alphabet"):
        sample_omniglot_episodes(mx.random.key(0), data, 2, 6, 1, 1, within_alphabet=True)
    with pytest.raises(ValueError, match="k_shot"):
        sample_omniglot_episodes(mx.random.key(0), data, 2, 2, 0, 1)
    with pytest.raises(TypeError, match="key"):
        sample_omniglot_episodes(mx.array([1, 2]), data, 2, 2, 1, 1)
    empty = split_omniglot(data, train=["A0"], val=[], test=["A1"]).val
    with pytest.raises(ValueError, match="exceeds the 0 classes"):
        sample_omniglot_episodes(mx.random.key(0), empty, 1, 2, 1, 1)
