"""Captions for labelled images: what an image generator trained on class labels is prompted with.

Each Fashion-MNIST class has a few names (with their article), each name goes into a few phrasings,
and a training image is paired with one of its class's captions at random. A second set of names
and phrasings is kept out of training: prompts worded unlike any training caption, to measure
whether the sentence encoder carries a prompt to the right class (benchmarks/imagine.py).

    captions = class_captions(FASHION_CLASS_NAMES)            # [["a t-shirt", "a photo of a t-shirt", ...], ...]
    unseen = class_captions(FASHION_UNSEEN_NAMES, UNSEEN_PHRASINGS)
"""
from __future__ import annotations

PHRASINGS = ["{}", "a photo of {}", "a picture of {}", "{} on a black background", "a grey image of {}",
             "a product shot of {}"]
UNSEEN_PHRASINGS = ["draw me {}", "I would like to see {}", "show {}", "an illustration of {}"]

# Names per class, in Fashion-MNIST's label order (plinth.vision.images.FASHION_MNIST_LABELS).
FASHION_CLASS_NAMES = [
    ["a t-shirt", "a top", "a tee shirt"],
    ["trousers", "a pair of trousers", "pants"],
    ["a pullover", "a sweater", "a jumper"],
    ["a dress", "a summer dress", "a long dress"],
    ["a coat", "a winter coat", "a jacket"],
    ["a sandal", "a pair of sandals", "an open shoe"],
    ["a shirt", "a button-up shirt", "a collared shirt"],
    ["a sneaker", "a trainer", "a running shoe"],
    ["a bag", "a handbag", "a purse"],
    ["an ankle boot", "a pair of boots", "a boot"],
]
FASHION_UNSEEN_NAMES = [
    ["a short-sleeved top", "a tee"],
    ["slacks", "a pair of jeans"],
    ["a knitted sweater", "a woolly jumper"],
    ["a gown", "an evening dress"],
    ["an overcoat", "a raincoat"],
    ["a flip-flop", "beach sandals"],
    ["a blouse", "a dress shirt"],
    ["a sports shoe", "a tennis shoe"],
    ["a tote bag", "a shoulder bag"],
    ["a leather boot", "boots"],
]


def class_captions(names: list[list[str]], phrasings: list[str] = PHRASINGS) -> list[list[str]]:
    """Per class: every name in every phrasing."""
    return [[phrasing.format(name) for name in class_names for phrasing in phrasings] for class_names in names]
