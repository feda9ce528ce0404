"""Built-in offline dataset: procedurally drawn RGB faces, with the factors that drew them.

Used when no CelebA is given. Every face is a stack of soft-edged shapes (background, long hair behind,
neck, head, hair on top, eyes, eyebrows, mouth) painted over each other. The whole batch is drawn at once
with array operations on the host (NumPy): about 2,000 faces a second at 64x64 on one core.

Each shape's edge is anti-aliased by its signed distance: a pixel's coverage is
``clip(0.5 - distance / pixel_size, 0, 1)``, so edges are one pixel soft at any image size.

``sample_factors`` draws the factors from a seed, ``render_faces`` draws faces for any factors (so a
latent-traversal demo can sweep one factor and hold the rest), and ``synthetic_faces`` does both.
"""
from __future__ import annotations

import colorsys

import numpy as np

# Continuous factors: name -> (low, high) of the uniform draw. Lengths are in units of half the image width
# (the image spans [-1, 1] on both axes, y pointing down).
CONTINUOUS = {
    "head_x": (-0.12, 0.12),  # horizontal position of the head centre
    "head_y": (-0.06, 0.10),  # vertical position of the head centre
    "head_width": (0.40, 0.56),  # half-width of the head ellipse
    "head_height": (0.52, 0.68),  # half-height of the head ellipse
    "skin_tone": (0.0, 1.0),  # 0 lightest .. 1 darkest skin colour
    "eye_size": (0.045, 0.085),  # radius of the eye white
    "eye_gap": (0.30, 0.42),  # half the distance between the eyes, as a fraction of head_width
    "eyebrow_raise": (0.0, 1.0),  # 0 low .. 1 high eyebrows
    "eyebrow_tilt": (-0.35, 0.35),  # radians; positive: inner ends lower (a frown)
    "mouth_width": (0.22, 0.42),  # half-width of the mouth, as a fraction of the head width
    "smile": (-0.6, 1.0),  # negative: corners down; positive: corners up
    "background_hue": (0.0, 1.0),  # hue of the plain background colour
}
HAIR_COLORS = ("black", "brown", "blonde", "red", "grey")
HAIR_STYLES = ("bald", "short", "long", "fringe")
# Categorical factors: name -> the names of their integer codes.
CATEGORICAL = {"hair_color": HAIR_COLORS, "hair_style": HAIR_STYLES}
FACTOR_NAMES = tuple(CONTINUOUS) + tuple(CATEGORICAL)

_HAIR_RGB = np.array(
    [[0.10, 0.08, 0.07], [0.36, 0.22, 0.12], [0.88, 0.74, 0.45], [0.66, 0.26, 0.10], [0.72, 0.72, 0.72]],
    np.float32,
)
_SKIN_LIGHT = np.array([0.98, 0.85, 0.74], np.float32)
_SKIN_DARK = np.array([0.38, 0.24, 0.16], np.float32)
_EYE_WHITE = np.array([0.97, 0.97, 0.95], np.float32)
_IRIS = np.array([0.16, 0.11, 0.08], np.float32)
_LIPS = np.array([0.62, 0.20, 0.22], np.float32)
# Pixels drawn per pass: 64 faces of 64x64 keep the temporaries in the CPU cache (the fastest chunk measured).
_CHUNK_PIXELS = 64 * 64 * 64


def sample_factors(n: int, seed=0) -> dict:
    """Draw the factors of ``n`` faces from ``seed`` (an int or a tuple of ints): name -> (n,) array.

    Continuous factors are float32, uniform over ``CONTINUOUS[name]``; categorical ones are int64 codes
    into ``CATEGORICAL[name]``.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"number of faces must be >= 0, got {n}")
    gen = np.random.default_rng(seed)
    factors = {name: gen.uniform(lo, hi, n).astype(np.float32) for name, (lo, hi) in CONTINUOUS.items()}
    for name, values in CATEGORICAL.items():
        factors[name] = gen.integers(0, len(values), n)
    return factors


def _coverage(dist, pix):
    """Anti-aliased coverage of a shape from its signed distance (negative inside), in [0, 1]."""
    return np.clip(0.5 - dist / pix, 0.0, 1.0)


def _ellipse_dist(u, v, cx, cy, a, b):
    """First-order signed distance to an axis-aligned ellipse: f / |grad f| with f the implicit form."""
    du, dv = u - cx, v - cy
    f = (du / a) ** 2 + (dv / b) ** 2 - 1.0
    grad = 2.0 * np.sqrt((du / a**2) ** 2 + (dv / b**2) ** 2)
    return f / (grad + 1e-6)


def _paint(img, cover, rgb):
    """Paint colour ``rgb`` (n, 3) over ``img`` (n, 3, H, W) with per-pixel coverage ``cover`` (n, H, W)."""
    c = cover[:, None]
    img *= 1.0 - c
    img += c * rgb[:, :, None, None]


def _col(x):
    """A per-face scalar (n,) as (n, 1, 1), to broadcast over the pixel grid."""
    return np.asarray(x, np.float32)[:, None, None]


def _render_chunk(f: dict, size: int) -> np.ndarray:
    """Draw the faces of one chunk of factors as float32 (n, 3, size, size) in [0, 1]."""
    n = len(f["head_x"])
    pix = 2.0 / size
    grid = (np.arange(size, dtype=np.float32) + 0.5) * pix - 1.0  # pixel centres
    v, u = grid[None, :, None], grid[None, None, :]

    hx, hy = _col(f["head_x"]), _col(f["head_y"])
    a, b = _col(f["head_width"]), _col(f["head_height"])
    tone = f["skin_tone"][:, None]
    skin = (1 - tone) * _SKIN_LIGHT + tone * _SKIN_DARK
    hair = _HAIR_RGB[f["hair_color"]]
    style = f["hair_style"]
    bg = np.array([colorsys.hsv_to_rgb(h, 0.35, 0.85) for h in f["background_hue"]], np.float32).reshape(n, 3)

    img = np.empty((n, 3, size, size), np.float32)
    img[:] = bg[:, :, None, None]

    # Long hair falls behind the head and shoulders: a wide ellipse reaching below the chin.
    long_hair = _col(np.isin(style, (HAIR_STYLES.index("long"), HAIR_STYLES.index("fringe"))))
    back = _coverage(_ellipse_dist(u, v, hx, hy + 0.25 * b, 1.28 * a, 1.2 * b), pix)
    _paint(img, back * long_hair, hair)

    # Neck: a rectangle below the head, in a slightly darker skin. Distance to a box is max of the sides.
    neck = np.maximum(np.abs(u - hx) - 0.45 * a, hy + 0.6 * b - v)
    _paint(img, _coverage(neck, pix), skin * 0.85)

    _paint(img, _coverage(_ellipse_dist(u, v, hx, hy, a, b), pix), skin)

    # Hair on top: inside a slightly larger ellipse and above the hairline; the intersection of two shapes
    # is the max of their distances. A fringe brings the hairline down over the forehead.
    hairline = np.where(style == HAIR_STYLES.index("fringe"), -0.38, -0.55).astype(np.float32)
    cap = np.maximum(_ellipse_dist(u, v, hx, hy - 0.03 * b, 1.07 * a, 1.05 * b), v - (hy + _col(hairline) * b))
    has_hair = _col(style != HAIR_STYLES.index("bald"))
    _paint(img, _coverage(cap, pix) * has_hair, hair)

    # Eyes: a white and an iris. Placed relative to the head so they move and scale with it.
    er = _col(f["eye_size"])
    ey = hy - 0.12 * b
    gap = _col(f["eye_gap"]) * a
    for side in (-1.0, 1.0):
        ex = hx + side * gap
        white = _coverage(_ellipse_dist(u, v, ex, ey, 1.35 * er, 0.85 * er), pix)
        _paint(img, white, np.broadcast_to(_EYE_WHITE, (n, 3)))
        iris = _coverage(_ellipse_dist(u, v, ex, ey, 0.62 * er, 0.62 * er), pix)
        _paint(img, iris, np.broadcast_to(_IRIS, (n, 3)))

        # Eyebrows: a thin ellipse in the eyebrow's own rotated frame (tilt > 0 lowers the inner end).
        by = ey - er - 0.06 - 0.08 * _col(f["eyebrow_raise"])
        t = _col(f["eyebrow_tilt"]) * side
        du, dv = u - ex, v - by
        ru, rv = du * np.cos(t) + dv * np.sin(t), -du * np.sin(t) + dv * np.cos(t)
        brow = _ellipse_dist(ru, rv, 0.0, 0.0, 1.9 * er, np.float32(0.032))
        _paint(img, _coverage(brow, pix), hair * 0.8)

    # Mouth: a band around the parabola v = my - smile * depth * (x / half_width)^2, cut off at the corners.
    mw = _col(f["mouth_width"]) * a
    my = hy + 0.5 * b
    dx = (u - hx) / mw
    arc = my - _col(f["smile"]) * 0.09 * (dx**2 - 0.35)
    mouth = np.maximum(np.abs(v - arc) - 0.035, (np.abs(dx) - 1.0) * mw)
    _paint(img, _coverage(mouth, pix), np.broadcast_to(_LIPS, (n, 3)) * (0.7 + 0.3 * skin))
    return img


def render_faces(factors: dict, image_size: int = 64) -> np.ndarray:
    """Draw one face per row of ``factors`` (name -> (n,) array): uint8 (n, 3, image_size, image_size)."""
    missing = [k for k in FACTOR_NAMES if k not in factors]
    if missing:
        raise ValueError(f"render_faces needs every factor in FACTOR_NAMES; missing {missing}")
    size = int(image_size)
    if size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    f = {k: np.asarray(factors[k]) for k in FACTOR_NAMES}
    f.update({k: np.asarray(factors[k], np.float32) for k in CONTINUOUS})
    for name, values in CATEGORICAL.items():
        codes = f[name].astype(np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= len(values)):
            raise ValueError(f"factor {name} must hold codes 0..{len(values) - 1} ({', '.join(values)})")
        f[name] = codes
    n = len(f["head_x"])
    out = np.empty((n, 3, size, size), np.uint8)
    step = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, n, step):
        chunk = {k: x[start : start + step] for k, x in f.items()}
        # + 0.5 then truncation rounds to nearest; values are already in [0, 1].
        out[start : start + step] = (_render_chunk(chunk, size) * 255.0 + 0.5).astype(np.uint8)
    return out


def synthetic_faces(n: int, image_size: int = 64, seed=0):
    """``n`` synthetic faces from ``seed``: (uint8 images (n, 3, H, W), factors name -> (n,) array)."""
    factors = sample_factors(n, seed)
    return render_faces(factors, image_size), factors
