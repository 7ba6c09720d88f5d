"""The image data layer (plinth/vision/images.py): IDX files, Fashion-MNIST, folder and JSONL
datasets, conversion, resizing, normalisation, bad input and balanced subsets. Images are made with
numpy and Pillow in tmp_path; the Fashion-MNIST check is skipped where its Debian package is missing."""
import gzip
import json
import math
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from plinth.config import preset
from plinth.errors import PlinthError
from plinth.vision import images as vi
from plinth.vision.images import (FASHION_MNIST_LABELS, ImagePrep, balanced_subset, fashion_mnist,
                                  fashion_mnist_available, labelled_images, read_idx, unlabelled_images)

MEAN, STD = [0.2, 0.5, 0.7], [0.3, 0.25, 0.1]
BICUBIC = Image.Resampling.BICUBIC  # the documented resize filter, pinned here so a change to it is seen


def grey_prep():
    return ImagePrep.from_config(preset("vit-tiny"))  # 8 × 8, 1 channel


def rgb_prep():
    return ImagePrep.from_config(preset("vit-tiny", channels=3, pixel_mean=MEAN, pixel_std=STD))


def noise(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return path


def write_idx(path, array, gzipped):
    codes = {np.dtype("u1"): 0x08, np.dtype(">i2"): 0x0B, np.dtype(">f4"): 0x0D}
    raw = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    return path


def warned(call):
    """(result, the messages of the warnings `call` gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


# IDX files

@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("dtype", ["u1", ">i2", ">f4"])
def test_read_idx_round_trip(tmp_path, gzipped, dtype):
    array = (np.arange(2 * 3 * 4) * 7 - 20).reshape(2, 3, 4).astype(dtype) if dtype != "u1" else noise(2, 3, 4)
    back = read_idx(write_idx(tmp_path / "x.idx", array, gzipped))
    assert back.shape == (2, 3, 4) and back.dtype == array.dtype.newbyteorder("=")
    assert np.array_equal(back, array) and back.flags.writeable


@pytest.mark.parametrize("damage, says", [
    (lambda raw: b"\x08\x03" + raw[2:], "not an IDX file"),            # bad magic
    (lambda raw: raw[:-5], "truncated or corrupt"),                     # fewer bytes than the header promises
    (lambda raw: raw + b"\0", "truncated or corrupt"),                  # more
    (lambda raw: gzip.compress(raw)[:-10], "broken gzip"),
])
def test_read_idx_bad_file_names_it(tmp_path, damage, says):
    raw = write_idx(tmp_path / "x.idx", noise(3, 4, 4), gzipped=False).read_bytes()
    (tmp_path / "bad.idx").write_bytes(damage(raw))
    with pytest.raises(PlinthError, match=says) as e:
        read_idx(tmp_path / "bad.idx")
    assert str(tmp_path / "bad.idx") in str(e.value)


# Fashion-MNIST

def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(vi, "FASHION_MNIST_DIR", tmp_path)
    assert not fashion_mnist_available()
    with pytest.raises(PlinthError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train")
    with pytest.raises(PlinthError, match="apt-get install dataset-fashion-mnist"):
        labelled_images("fashion-mnist", grey_prep())
    with pytest.raises(PlinthError, match="no split 'val'; choose train or test"):
        fashion_mnist("val")


@pytest.mark.skipif(not fashion_mnist_available(), reason=f"Fashion-MNIST is not installed at {vi.FASHION_MNIST_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_data():
    images, labels = fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    # At the config's size and channels: the arrays themselves, bit-exact.
    at_28 = ImagePrep.from_config(preset("vit-tiny", image_size=28, max_seq_len=197))
    data = labelled_images("fashion-mnist", at_28, split="test")
    assert data.pixels.shape == (10000, 1, 28, 28) and torch.equal(data.pixels[:, 0], torch.from_numpy(test_images))
    assert torch.equal(data.labels, torch.from_numpy(test_labels)) and data.names == FASHION_MNIST_LABELS
    # At another size: each image resized like any other.
    small = unlabelled_images("fashion-mnist", grey_prep(), split="test")
    assert small.shape == (10000, 1, 8, 8)
    for i in (0, 4321, 9999):
        expected = np.asarray(Image.fromarray(test_images[i]).resize((8, 8), BICUBIC))
        assert np.array_equal(small[i, 0].numpy(), expected)


# Datasets: folders and JSONL

def test_folder_dataset(tmp_path):
    cat, dog = [noise(8, 8, seed=s) for s in (1, 2)], [noise(8, 8, seed=s) for s in (3, 4, 5)]
    for i, a in enumerate(cat):
        save(tmp_path / "cat" / f"{i}.png", a)
    for i, a in enumerate(dog):
        save(tmp_path / "dog" / "sub" / f"{i}.BMP", a)  # any depth, extension in any case
    (tmp_path / "dog" / "notes.txt").write_text("not an image")         # not an image extension: skipped
    save(tmp_path / ".ipynb_checkpoints" / "x.png", noise(8, 8))         # hidden: not a class
    save(tmp_path / "cat" / ".hidden.png", noise(8, 8))                 # hidden: not data
    data = labelled_images(str(tmp_path), grey_prep())
    assert data.names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.pixels.dtype == torch.uint8 and data.pixels.shape == (5, 1, 8, 8)
    assert torch.equal(data.pixels[:, 0], torch.from_numpy(np.stack(cat + dog)))


def test_jsonl_dataset(tmp_path):
    a, b, c = noise(8, 8, seed=1), noise(8, 8, seed=2), noise(8, 8, seed=3)
    save(tmp_path / "imgs" / "a.png", a)
    save(tmp_path / "imgs" / "b.png", b)
    absolute = save(tmp_path / "elsewhere" / "c.png", c)
    lines = [{"image": "imgs/a.png", "label": "zebra"}, {"image": "imgs/b.png", "label": "ant"},
             {"image": str(absolute), "label": "zebra"}]
    (tmp_path / "data.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    data = labelled_images(str(tmp_path / "data.jsonl"), grey_prep())
    assert data.names == ["ant", "zebra"] and data.labels.tolist() == [1, 0, 1]
    assert torch.equal(data.pixels[:, 0], torch.from_numpy(np.stack([a, b, c])))


def test_unlabelled_images_folder_and_jsonl(tmp_path):
    a, b = noise(8, 8, seed=1), noise(8, 8, seed=2)
    save(tmp_path / "pics" / "a.png", a)
    save(tmp_path / "pics" / "deep" / "er" / "b.png", b)
    assert torch.equal(unlabelled_images(str(tmp_path / "pics"), grey_prep())[:, 0], torch.from_numpy(np.stack([a, b])))
    (tmp_path / "u.jsonl").write_text('{"image": "pics/deep/er/b.png"}\n{"image": "pics/a.png"}\n')  # no labels needed
    back = unlabelled_images(str(tmp_path / "u.jsonl"), grey_prep())
    assert torch.equal(back[:, 0], torch.from_numpy(np.stack([b, a])))


# Label sets

def test_label_set_orders_names_and_rejects_unknown_labels(tmp_path):
    for name, seed in (("cat", 1), ("dog", 2)):
        save(tmp_path / "pets" / name / "0.png", noise(8, 8, seed=seed))
    data = labelled_images(str(tmp_path / "pets"), grey_prep(), labels=["dog", "bird", "cat"])  # bird: absent, fine
    assert data.names == ["dog", "bird", "cat"] and data.labels.tolist() == [2, 0]
    with pytest.raises(PlinthError, match="label 'dog'") as e:
        labelled_images(str(tmp_path / "pets"), grey_prep(), labels=["cat"])
    assert str(tmp_path / "pets" / "dog") in str(e.value) and "train a new head" in str(e.value)
    (tmp_path / "d.jsonl").write_text('{"image": "pets/cat/0.png", "label": "cat"}\n'
                                      '{"image": "pets/dog/0.png", "label": "wolf"}\n')
    with pytest.raises(PlinthError, match=r"label 'wolf' \(.*d\.jsonl, line 2\)"):
        labelled_images(str(tmp_path / "d.jsonl"), grey_prep(), labels=["cat", "dog"])
    with pytest.raises(PlinthError, match="distinct class names"):
        labelled_images(str(tmp_path / "d.jsonl"), grey_prep(), labels=["cat", "cat"])


def test_fashion_mnist_label_set(monkeypatch):
    small = {split: (noise(4, 28, 28), np.array([8, 0, 8, 9])) for split in ("train", "test")}
    monkeypatch.setattr(vi, "fashion_mnist", lambda split: small[split])  # the remapping, without the real files
    data = labelled_images("fashion-mnist", grey_prep(), labels=["Bag", "T-shirt/top", "Ankle boot", "Coat"])
    assert data.labels.tolist() == [0, 1, 0, 2]
    with pytest.raises(PlinthError, match="label 'Ankle boot' \\(fashion-mnist train\\)"):
        labelled_images("fashion-mnist", grey_prep(), labels=["Bag", "T-shirt/top"])


# Converting, resizing, normalising

def test_normalize_matches_formula():
    prep = rgb_prep()
    pixels = torch.from_numpy(noise(2, 3, 8, 8))
    out = prep.normalize(pixels)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    for c in range(3):
        expected = (pixels[:, c].double() / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(out[:, c].double(), expected, atol=1e-5)
    with pytest.raises(PlinthError, match=r"uint8 pixels of shape \(B, 3, 8, 8\)"):
        prep.normalize(pixels.float())


def test_batch_is_normalize_of_pixels(tmp_path):
    prep = rgb_prep()
    images = [save(tmp_path / "a.png", noise(8, 8, 3, seed=1)), Image.fromarray(noise(8, 8, 3, seed=2)),
              noise(8, 8, 3, seed=3)]
    expected = prep.normalize(torch.from_numpy(np.stack([prep.pixels(i) for i in images])))
    assert torch.equal(prep.batch(images), expected)
    alone = torch.from_numpy(noise(8, 8, 3, seed=2).transpose(2, 0, 1).copy())[None]  # (1, 3, 8, 8)
    assert torch.equal(expected[1], prep.normalize(alone)[0])
    with pytest.raises(PlinthError, match="at least one"):
        prep.batch([])


def test_resize_is_whole_image_with_the_fixed_filter(tmp_path):
    # 24 wide, 12 high; the right-most 3 columns white: a crop to the centre square would lose them.
    image = noise(12, 24, seed=7) // 4
    image[:, -3:] = 255
    path = save(tmp_path / "wide.png", image)
    expected = np.asarray(Image.fromarray(image).resize((8, 8), BICUBIC))
    for given in (path, Image.open(path), image):
        assert np.array_equal(grey_prep().pixels(given), expected[None])
    assert (expected[:, -1] > 200).all()  # stretched, not cropped: the white edge is still there
    assert not np.array_equal(expected, np.asarray(Image.fromarray(image).resize((8, 8), Image.Resampling.NEAREST)))


def test_matching_size_is_not_resampled(tmp_path):
    grey, rgb = noise(8, 8, seed=1), noise(8, 8, 3, seed=2)
    assert np.array_equal(grey_prep().pixels(save(tmp_path / "g.png", grey)), grey[None])
    assert np.array_equal(grey_prep().pixels(grey[:, :, None]), grey[None])
    assert np.array_equal(rgb_prep().pixels(save(tmp_path / "c.png", rgb)), rgb.transpose(2, 0, 1))
    assert np.array_equal(rgb_prep().pixels(rgb), rgb.transpose(2, 0, 1))


def test_grey_to_rgb_converted_and_said_once(tmp_path):
    prep = rgb_prep()
    grey = [save(tmp_path / f"g{i}.png", noise(8, 8, seed=i)) for i in range(3)]
    out, said = warned(lambda: [prep.pixels(p) for p in grey])
    assert all(np.array_equal(o, np.repeat(noise(8, 8, seed=i)[None], 3, axis=0)) for i, o in enumerate(out))
    assert len(said) == 1 and str(grey[0]) in said[0] and "converted from mode L to RGB" in said[0]
    _, said_again = warned(lambda: prep.pixels(noise(8, 8)))
    assert said_again == []  # once per ImagePrep...
    _, fresh = warned(lambda: rgb_prep().pixels(noise(8, 8)))
    assert len(fresh) == 1   # ...not once per process


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_colour_to_grey_converted(tmp_path, mode):
    path = save(tmp_path / "c.png", noise(8, 8, 3), mode)
    out, said = warned(lambda: grey_prep().pixels(path))
    assert np.array_equal(out[0], np.asarray(Image.open(path).convert("L"))) and len(said) == 1
    assert f"mode {mode} to L" in said[0]


def test_rgba_array_to_rgb_model_drops_alpha():
    rgba = noise(8, 8, 4)
    out, said = warned(lambda: rgb_prep().pixels(rgba))
    assert np.array_equal(out, rgba[:, :, :3].transpose(2, 0, 1)) and "mode RGBA to RGB" in said[0]


def test_sixteen_bit_grey_keeps_its_top_byte(tmp_path):
    deep = (noise(8, 8).astype(np.uint16) << 8) | 0x7F
    path = save(tmp_path / "deep.png", deep)
    out, _ = warned(lambda: grey_prep().pixels(path))
    assert np.array_equal(out[0], (deep >> 8).astype(np.uint8))  # Pillow's own convert would clip all to 255


# Bad input: each a PlinthError naming the file and the fix

def truncated_png(tmp_path):
    path = save(tmp_path / "cut.png", noise(32, 32))
    path.write_bytes(path.read_bytes()[:600])
    return path


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "missing.png", "no such image file"),
    (lambda d: (d / "text.png").write_text("hello") and d / "text.png", "not an image Pillow can read"),
    (truncated_png, "truncated or corrupt"),
])
def test_bad_image_file_is_named(tmp_path, make, says):
    path = make(tmp_path)
    with pytest.raises(PlinthError, match=says) as e:
        grey_prep().pixels(path)
    assert str(path) in str(e.value)
    # In a dataset too, with nothing returned for the images before it.
    save(tmp_path / "set" / "a" / "0.png", noise(8, 8))
    if path.exists():
        (tmp_path / "set" / "b").mkdir()
        path.rename(tmp_path / "set" / "b" / path.name)
        with pytest.raises(PlinthError, match=says) as e:
            labelled_images(str(tmp_path / "set"), grey_prep())
        assert str(tmp_path / "set" / "b" / path.name) in str(e.value)


@pytest.mark.parametrize("lines, says", [
    ('{"label": "cat"}', r"j\.jsonl, line 1: missing field 'image'; each line must be like"),
    ('{"image": "nope.png", "label": "cat"}', r"j\.jsonl, line 1: no such image file .*nope\.png; a relative path"),
    ('{"image": "a.png", "label": 3}', r"line 1: field 'label' must be str"),
])
def test_bad_jsonl_lines(tmp_path, lines, says):
    save(tmp_path / "a.png", noise(8, 8))
    (tmp_path / "j.jsonl").write_text(lines + "\n")
    with pytest.raises(PlinthError, match=says):
        labelled_images(str(tmp_path / "j.jsonl"), grey_prep())


def test_unreadable_image_in_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "bad.png").write_text("hello")
    (tmp_path / "j.jsonl").write_text('{"image": "bad.png"}\n')
    with pytest.raises(PlinthError, match=r"bad\.png is not an image .*listed at .*j\.jsonl, line 1"):
        unlabelled_images(str(tmp_path / "j.jsonl"), grey_prep())


def test_bad_folders(tmp_path):
    save(tmp_path / "flat" / "0.png", noise(8, 8))
    with pytest.raises(PlinthError, match="has no class sub-folders; put each class's images in a sub-folder") as e:
        labelled_images(str(tmp_path / "flat"), grey_prep())
    assert str(tmp_path / "flat") in str(e.value)
    save(tmp_path / "classes" / "cat" / "0.png", noise(8, 8))
    (tmp_path / "classes" / "dog").mkdir()
    (tmp_path / "classes" / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(PlinthError, match=r"class folder .*classes/dog holds no images .*; add its images or remove"):
        labelled_images(str(tmp_path / "classes"), grey_prep())
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlinthError, match=r"empty holds no images"):
        unlabelled_images(str(tmp_path / "empty"), grey_prep())
    with pytest.raises(PlinthError, match=r"nowhere does not exist; give 'fashion-mnist', a folder"):
        labelled_images(str(tmp_path / "nowhere"), grey_prep())


def test_bad_arrays_and_configs():
    with pytest.raises(PlinthError, match=r"uint8 .* not float32 \(8, 8\); scale it to 0-255"):
        grey_prep().pixels(np.zeros((8, 8), np.float32))
    with pytest.raises(PlinthError, match=r"not uint8 \(8, 8, 2\)"):
        grey_prep().pixels(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(PlinthError, match="reads text, not images"):
        ImagePrep.from_config(preset("tiny"))


# Balanced subsets

def test_balanced_subset():
    labels = torch.tensor([0] * 100 + [1] * 30 + [2] * 3 + [1] * 20)  # classes 100, 50, 3
    picked = balanced_subset(labels, 0.1, seed=0)
    assert picked.dtype == torch.int64 and torch.equal(picked, picked.sort().values)
    assert len(set(picked.tolist())) == len(picked)
    assert torch.bincount(labels[picked]).tolist() == [10, 5, 1]  # round(0.3) = 0 -> at least 1
    assert torch.equal(picked, balanced_subset(labels, 0.1, seed=0))                 # fixed per seed
    assert not torch.equal(picked, balanced_subset(labels, 0.1, seed=1))             # different across seeds
    assert torch.equal(balanced_subset(labels, 1.0, seed=3), torch.arange(len(labels)))
    for bad in (0, -0.5, 1.5, math.nan, True, "0.1"):
        with pytest.raises(PlinthError, match=r"fraction=.*; give a number in \(0, 1\]"):
            balanced_subset(labels, bad, seed=0)
