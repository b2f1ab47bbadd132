"""Synthetic segmentation images, drawn on the fly, in two tasks.

multilabel: five classes, each an independent sigmoid channel; shapes overlap, so a pixel
can carry several labels, and the image adds the classes' colours where they overlap.
multiclass: the same drawings with one class per pixel (a shape painted later covers the
ones below it; "background" where nothing is), as uint8 class ids, plus an unannotated
rectangle in about half the images, labelled IGNORE_ID (a softmax loss's ignore_index).
"spot" is the deliberately rare class: tiny dots in about one image in five (under 0.1 % of
pixels), the situation where a small total loss hides a class nobody predicts.
"""
import numpy as np

CLASS_NAMES = ("disc", "box", "bar", "ring", "spot")
RARE_CLASS = CLASS_NAMES.index("spot")
_COLOURS = np.array([[0.9, 0.25, 0.2],   # disc
                     [0.2, 0.8, 0.25],   # box
                     [0.2, 0.3, 0.9],    # bar
                     [0.75, 0.7, 0.1],   # ring
                     [0.85, 0.85, 0.85]], np.float32)  # spot
SPOT_PROBABILITY = 0.2
MULTICLASS_NAMES = ("background",) + CLASS_NAMES
IGNORE_ID = 255


def _disc(yy, xx, cy, cx, radius):
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def draw_image(rng, size):
    """One (image [S, S, 3] float32, labels [S, S, 5] float32 in {0, 1}) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    masks = np.zeros((len(CLASS_NAMES), size, size), bool)
    image = 0.25 + 0.15 * (np.sin(yy / size * rng.uniform(1, 4) + rng.uniform(0, 6))[..., None]
                           * rng.uniform(-1, 1, 3))
    image = np.broadcast_to(image, (size, size, 3)).astype(np.float32).copy()

    def paint(klass, mask):
        masks[klass] |= mask
        image[mask] += rng.uniform(0.5, 1.0) * _COLOURS[klass]

    for _ in range(rng.integers(1, 4)):
        paint(0, _disc(yy, xx, *rng.uniform(0, size, 2), rng.uniform(0.08, 0.2) * size))
    for _ in range(rng.integers(1, 3)):
        y0, x0 = rng.uniform(-0.1, 0.9, 2) * size
        h, w = rng.uniform(0.12, 0.35, 2) * size
        paint(1, (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w))
    for _ in range(rng.integers(0, 3)):
        centre, width = rng.uniform(0, size), rng.uniform(1.5, 3.5)
        paint(2, np.abs((yy if rng.random() < 0.5 else xx) - centre) <= width / 2)
    if rng.random() < 0.5:
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        radius = rng.uniform(0.12, 0.22) * size
        paint(3, _disc(yy, xx, cy, cx, radius) & ~_disc(yy, xx, cy, cx, radius - 2.0))
    if rng.random() < SPOT_PROBABILITY:
        for _ in range(rng.integers(1, 3)):
            paint(4, _disc(yy, xx, *rng.uniform(2, size - 2, 2), rng.uniform(1.2, 2.2)))

    image += rng.normal(0.0, 0.06, image.shape).astype(np.float32)
    return image, np.moveaxis(masks, 0, -1).astype(np.float32)


def draw_multiclass_image(rng, size):
    """One (image [S, S, 3] float32, class ids [S, S] uint8) pair: 0 is background, class k
    of CLASS_NAMES is k + 1 (the last one painted wins), IGNORE_ID unannotated."""
    image, masks = draw_image(rng, size)
    ids = np.zeros((size, size), np.uint8)
    for klass in range(masks.shape[-1]):  # painting order: spots end on top
        ids[masks[..., klass] > 0] = klass + 1
    if rng.random() < 0.5:
        y0, x0 = rng.integers(0, size - size // 4, 2)
        ids[y0:y0 + size // 4, x0:x0 + size // 4] = IGNORE_ID
    return image, ids


def draw_batch(rng, batch, size, task="multilabel"):
    draw = draw_multiclass_image if task == "multiclass" else draw_image
    pairs = [draw(rng, size) for _ in range(batch)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def batches(seed, batch, size, task="multilabel"):
    """An endless generator of (images, labels) batches for model.fit."""
    rng = np.random.default_rng(seed)
    while True:
        yield draw_batch(rng, batch, size, task)
