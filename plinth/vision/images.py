"""Images in: decode, convert and resize every image the same way, and read image datasets
(Fashion-MNIST from its Debian package, a folder of class sub-folders, a JSONL file) as tensors.

Every image a model sees, in pretraining, fine-tuning, eval, `plinth classify` and the server, goes
through one `ImagePrep` built from the model's config, so a picture becomes the same pixels in each:

    prep = ImagePrep.from_config(preset("vit-tiny"))
    data = labelled_images("fashion-mnist", prep, split="test")  # uint8 (N, 1, 8, 8), int64 (N,), names
    x = prep.normalize(data.pixels[:32])                           # float32 (32, 1, 8, 8)
    x = prep.batch(["cat.png", "dog.jpg"])                         # the same, from files

The rules: an image is converted to the model's channels (grey "L" or "RGB"; said once per ImagePrep);
an image of another size is resized whole to image_size × image_size, never cropped, so a non-square
image is stretched rather than losing its edges; an image already at that size is not resampled.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import numbers
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from plinth.adapt.examples import read_jsonl
from plinth.errors import PlinthError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}  # split -> the files' prefix
FASHION_MNIST = "fashion-mnist"  # the source name
EASY_VQA = "easy-vqa"  # PyPI easy-vqa's images (pip install --no-deps easy-vqa): shapes for image+text models

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # matched case-insensitively

# The one filter for every resize. BICUBIC because Pillow widens its kernel by the scale factor when
# shrinking, so every source pixel counts (no aliasing, unlike NEAREST); when enlarging it is sharper
# than BILINEAR without LANCZOS's ringing at edges; and it is what ViT's reference preprocessing uses.
RESIZE_FILTER = Image.Resampling.BICUBIC

# IDX element type (the magic number's third byte) -> numpy dtype; multi-byte values are big-endian.
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not) as a native-endian array of its shape and type."""
    path = Path(path)
    if not path.is_file():
        raise PlinthError(f"no such IDX file: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic: decided by content, so a renamed file still reads
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise PlinthError(f"{path} is a broken gzip file ({e}); download or reinstall it") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise PlinthError(f"{path} is not an IDX file: its magic number is {raw[:4].hex() or 'missing'}, expected "
                          f"0000, a type byte (08 = uint8) and the number of dimensions; give an IDX file such "
                          f"as train-images-idx3-ubyte.gz")
    dtype, header = IDX_TYPES[raw[2]], 4 + 4 * raw[3]
    shape = struct.unpack(f">{raw[3]}I", raw[4:header]) if len(raw) >= header else ()
    size = header + math.prod(shape) * dtype.itemsize
    if not shape or len(raw) != size:
        raise PlinthError(f"{path}: its header promises {dtype.name} values of shape {shape or '?'} "
                          f"({size if shape else 'more than'} bytes), but the file has {len(raw)} bytes; it is "
                          f"truncated or corrupt: download or reinstall it")
    # astype copies into a writable native-endian array (a view of the bytes would be read-only)
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_mnist_paths(split: str) -> tuple[Path, Path]:
    """The images and labels files of a Fashion-MNIST split."""
    prefix = FASHION_MNIST_SPLITS[split]
    return (FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")


def fashion_mnist_available() -> bool:
    return all(p.is_file() for split in FASHION_MNIST_SPLITS for p in _fashion_mnist_paths(split))


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's "train" (60,000) or "test" (10,000) split: uint8 images (N, 28, 28), light
    garments on black, and int64 labels (N,) indexing FASHION_MNIST_LABELS."""
    if split not in FASHION_MNIST_SPLITS:
        raise PlinthError(f"Fashion-MNIST has no split {split!r}; choose train or test")
    images_path, labels_path = _fashion_mnist_paths(split)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise PlinthError(f"Fashion-MNIST is not installed (no {path}); install it with "
                              f"`apt-get install dataset-fashion-mnist`")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if (images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.dtype != np.uint8
            or labels.shape != images.shape[:1] or labels.max(initial=0) >= len(FASHION_MNIST_LABELS)):
        raise PlinthError(f"{images_path} and {labels_path} do not hold Fashion-MNIST (shapes {images.shape} and "
                          f"{labels.shape}); reinstall dataset-fashion-mnist")
    return images, labels.astype(np.int64)


class ImagePrep:
    """How a model sees an image: size, channels and normalisation from its ModelConfig, applied
    identically in training, eval, classify and serving."""

    def __init__(self, image_size: int, channels: int, pixel_mean: list[float], pixel_std: list[float]):
        self.size, self.channels = image_size, channels
        self.mode = "L" if channels == 1 else "RGB"  # the Pillow mode the model's pixels have
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
        self._noted = False  # whether the conversion note has been given (once per instance)

    @classmethod
    def from_config(cls, config) -> "ImagePrep":
        if not config.is_image:
            raise PlinthError("this model reads text, not images (its config has no patch_size); give an image "
                              "model, such as one built from the vit-tiny preset")
        return cls(config.image_size, config.channels, config.pixel_mean, config.pixel_std)

    def pixels(self, image) -> np.ndarray:
        """One image as the model's uint8 pixels (C, S, S). `image`: a path, a PIL.Image, or a uint8
        numpy array (H, W) or (H, W, C) with C 1, 3 or 4 (RGBA)."""
        if isinstance(image, (str, os.PathLike)):
            return self._fit(_open_image(image), str(image))
        if isinstance(image, Image.Image):
            name = getattr(image, "filename", "") or "an image"
            return self._fit(_decoded(image, name), name)
        if isinstance(image, np.ndarray):
            return self._from_array(image)
        raise PlinthError(f"cannot read an image from a {type(image).__name__}; give a file path, a PIL.Image or "
                          f"a uint8 numpy array")

    def _from_array(self, array: np.ndarray) -> np.ndarray:
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise PlinthError(f"an image array must be uint8 (H, W) or (H, W, C) with C 1, 3 or 4, not {array.dtype} "
                              f"{array.shape}; scale it to 0-255 and cast it with .astype(np.uint8)")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.shape[:2] == (self.size, self.size) and (1 if array.ndim == 2 else array.shape[2]) == self.channels:
            # Already the model's size and channels: the bytes Pillow would give back, without a round trip.
            return _channels_first(array)
        return self._fit(Image.fromarray(array), "an image array")

    def _fit(self, image: Image.Image, name: str) -> np.ndarray:
        """Convert to the model's channels, resize to S × S: the one path every image takes."""
        if image.mode != self.mode:
            self._note(f"{name}: converted from mode {image.mode} to {self.mode} for this {self.channels}-channel "
                       f"model (later images that need converting are converted without a note)")
            image = _converted(image, self.mode, name)
        if image.size != (self.size, self.size):  # equal: no resampling, so the pixels stay bit-exact
            image = image.resize((self.size, self.size), RESIZE_FILTER)
        return _channels_first(np.asarray(image))

    def _note(self, message: str):
        # A note, not an error: a converted image is usable, but the user may have picked the wrong model.
        if not self._noted:
            self._noted = True
            warnings.warn(message, stacklevel=4)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) -> float32 (pixel/255 - mean) / std, per channel."""
        expected = (self.channels, self.size, self.size)
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise PlinthError(f"expected uint8 pixels of shape (B, {', '.join(map(str, expected))}), got "
                              f"{pixels.dtype} {tuple(pixels.shape)}; make them with ImagePrep.pixels or batch")
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels.to(torch.float32) / 255 - mean) / std

    def batch(self, images: list) -> torch.Tensor:
        """float32 (B, C, S, S): the model's input for a list of images (paths, PIL images, arrays)."""
        if not images:
            raise PlinthError("no images to batch; give at least one")
        return self.normalize(_stack(self, images))


def _channels_first(array: np.ndarray) -> np.ndarray:
    """(S, S) or (S, S, C) -> contiguous (C, S, S)."""
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


def _open_image(path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise PlinthError(f"no such image file: {path}; check the path")
    try:
        with Image.open(path) as image:  # the file closes here; the decoded pixels stay
            return _decoded(image, str(path))
    except UnidentifiedImageError as e:
        raise PlinthError(f"{path} is not an image Pillow can read; convert it to PNG or JPEG, or remove it") from e
    except Image.DecompressionBombError as e:
        raise PlinthError(f"{path} is too large to decode safely ({e}); shrink it first") from e
    except OSError as e:  # unreadable: permissions, a file that vanished
        raise PlinthError(f"cannot read {path} ({e}); check that the file is readable") from e


def _decoded(image: Image.Image, name: str) -> Image.Image:
    """Decode the pixels now: Pillow decodes lazily, and a truncated file must fail here, by name."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise PlinthError(f"{name} is truncated or corrupt ({e}); re-save it or remove it") from e
    return image


def _converted(image: Image.Image, mode: str, name: str) -> Image.Image:
    if image.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip at 255, so keep the top byte
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    elif image.mode in ("I", "F"):
        raise PlinthError(f"{name} has 32-bit pixels (mode {image.mode}) whose range cannot be told; save it as an "
                          f"8-bit PNG or JPEG")
    return image.convert(mode)  # RGBA, LA: alpha dropped; P: palette looked up; CMYK, 1, ...: Pillow's formulas


def _stack(prep: ImagePrep, images: list, listed: list[str | None] | None = None) -> torch.Tensor:
    """uint8 (N, C, S, S) of prep.pixels(each), filled in place; `listed` names where each was listed."""
    out = np.empty((len(images), prep.channels, prep.size, prep.size), np.uint8)
    for i, image in enumerate(images):
        try:
            out[i] = prep.pixels(image)
        except PlinthError as e:
            if listed and listed[i]:
                raise PlinthError(f"{e} (listed at {listed[i]})") from e
            raise
    return torch.from_numpy(out)


@dataclass
class LabelledImages:
    pixels: torch.Tensor    # uint8 (N, C, S, S)
    labels: torch.Tensor    # int64 (N,), indices into names
    names: list[str]        # class names


def labelled_images(source: str, prep: ImagePrep, labels: list[str] | None = None,
                    split: str = "train") -> LabelledImages:
    """Images and their labels from "fashion-mnist" (`split` train or test), a folder with one
    sub-folder of images per class, or a JSONL file of {"image": path, "label": name} lines (a folder
    or JSONL file is its own split; `split` is for Fashion-MNIST). Class names are `labels` (a head's
    label set, in its order) when given, else Fashion-MNIST's, the sorted sub-folders or the sorted labels."""
    if str(source) == FASHION_MNIST:
        images, y = fashion_mnist(split)
        found = {FASHION_MNIST_LABELS[i]: f"{FASHION_MNIST} {split}" for i in np.unique(y)}
        names = _label_names(found, labels, FASHION_MNIST_LABELS)
        lookup = np.array([names.index(n) if n in names else -1 for n in FASHION_MNIST_LABELS])
        return LabelledImages(_fashion_pixels(images, prep), torch.from_numpy(lookup[y]), names)
    kind, path = _source_kind(source)
    files, data_labels, listed, found = _class_folders(path) if kind == "folder" else _jsonl_images(path, labelled=True)
    names = _label_names(found, labels, sorted(found))
    index = {name: i for i, name in enumerate(names)}
    targets = torch.tensor([index[label] for label in data_labels], dtype=torch.int64)
    return LabelledImages(_stack(prep, files, listed), targets, names)


def easy_vqa_folder() -> Path:
    """The data folder of the installed easy-vqa package (found without importing it)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise PlinthError("easy-VQA is not installed; install its files with: pip install --no-deps easy-vqa")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def unlabelled_images(source: str, prep: ImagePrep, split: str = "train") -> torch.Tensor:
    """uint8 (N, C, S, S) for masked-autoencoder pretraining: Fashion-MNIST's or easy-VQA's images,
    every image under a folder (any depth), or the "image" of each JSONL line."""
    if str(source) == FASHION_MNIST:
        return _fashion_pixels(fashion_mnist(split)[0], prep)
    if str(source) == EASY_VQA:
        return _stack(prep, _image_files(easy_vqa_folder() / split / "images"))
    kind, path = _source_kind(source)
    if kind == "jsonl":
        files, _, listed, _ = _jsonl_images(path, labelled=False)
        return _stack(prep, files, listed)
    files = _image_files(path)
    if not files:
        raise PlinthError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders; "
                          f"point at a folder of images")
    return _stack(prep, files)


def _fashion_pixels(images: np.ndarray, prep: ImagePrep) -> torch.Tensor:
    if (prep.size, prep.channels) == (28, 1):
        return torch.from_numpy(images).unsqueeze(1)  # (N, 1, 28, 28): already the model's pixels
    return _stack(prep, images)  # each through the path any array takes (resize, grey -> RGB)


def _source_kind(source) -> tuple[str, Path]:
    path = Path(source)
    if path.is_dir():
        return "folder", path
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return "jsonl", path
    problem = "does not exist" if not path.exists() else "is neither a folder nor a .jsonl file"
    raise PlinthError(f"image source {source} {problem}; give {FASHION_MNIST!r}, a folder with one sub-folder of "
                      f"images per class, or a .jsonl file of {{\"image\": path, \"label\": name}} lines")


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, at any depth, sorted; hidden files and folders (.ipynb_checkpoints,
    .DS_Store) are not data."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(root: Path):
    """The ImageFolder layout (root/CLASS/**/IMAGE): files, their labels, None per file (a file
    names itself), and label -> its class folder."""
    classes = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not classes:
        raise PlinthError(f"{root} has no class sub-folders; put each class's images in a sub-folder named for the "
                          f"class ({root / 'cat' / '1.png'}, {root / 'dog' / '2.png'}, ...)")
    files, labels, found = [], [], {}
    for folder in classes:
        members = _image_files(folder)
        if not members:
            raise PlinthError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add its "
                              f"images or remove the folder")
        files += members
        labels += [folder.name] * len(members)
        found[folder.name] = f"class folder {folder}"
    return files, labels, [None] * len(files), found


def _jsonl_images(path: Path, labelled: bool):
    """A JSONL file's image paths (relative to its folder unless absolute), labels, "FILE, line N" for
    each, and label -> where it first appears."""
    fields = {"image": str, "label": str} if labelled else {"image": str}
    try:
        records = read_jsonl(path, fields)
    except PlinthError as e:
        raise PlinthError(f"{e}; each line must be like {{\"image\": \"cats/1.png\", \"label\": \"cat\"}}") from e
    files, labels, listed, found = [], [], [], {}
    for number, record in records:
        where, file = f"{path}, line {number}", path.parent / record["image"]  # an absolute path replaces the folder
        if not file.is_file():
            raise PlinthError(f"{where}: no such image file {file}; a relative path is read from the JSONL file's "
                              f"folder")
        files.append(file)
        listed.append(where)
        if labelled:
            labels.append(record["label"])
            found.setdefault(record["label"], where)
    return files, labels, listed, found


def _label_names(found: dict[str, str], labels: list[str] | None, default: list[str]) -> list[str]:
    """The class names: `labels` (a head's label set) when given, checked to hold every label the
    data has (`found`: label -> where it is); else `default`."""
    if labels is None:
        return list(default)
    if not labels or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise PlinthError(f"labels={labels!r}; give a list of distinct class names")
    for label, where in found.items():
        if label not in labels:
            raise PlinthError(f"label {label!r} ({where}) is not one of the model's labels {labels}; relabel or "
                              f"drop those images, or train a new head whose labels include {label!r}")
    return list(labels)


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted int64 indices of a fixed, class-balanced subset: from each class, round(fraction ×
    its count) examples (at least 1), drawn by numpy's Generator seeded with `seed`; 1.0 = all."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise PlinthError(f"fraction={fraction!r}; give a number in (0, 1], such as 0.1 for a tenth of each "
                          f"class (1 keeps all)")
    y = torch.as_tensor(labels).cpu().numpy()
    if fraction == 1 or len(y) == 0:
        return torch.arange(len(y), dtype=torch.int64)
    rng = np.random.default_rng(seed)
    picks = [rng.choice(members, size=max(1, round(fraction * len(members))), replace=False)
             for members in (np.flatnonzero(y == c) for c in np.unique(y))]  # classes in sorted order
    return torch.from_numpy(np.sort(np.concatenate(picks))).to(torch.int64)


__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_LABELS", "ImagePrep", "LabelledImages", "balanced_subset",
           "fashion_mnist", "fashion_mnist_available", "labelled_images", "read_idx", "unlabelled_images"]
