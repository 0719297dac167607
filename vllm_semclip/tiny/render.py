"""The randomised rendering distribution: how a coloured shape may look, and where it may lie.

One object, :class:`RenderDistribution`, draws backgrounds, shades and object styles for the
benchmark writer (:mod:`vllm_semclip.eval.benchdata`) and for the tiny models' training material
alike, so a model is trained and measured on the same kind of scene — except for the parts the
``shifted`` split keeps to itself:

* **shades**: a colour name is a region of colour space. Every reference shade (this package's
  first palette, CSS named colours, easy-VQA's own RGB values) owns the shades nearer to it than
  to any other reference; a name's training region is its ``TRAIN_SHADES``' cells, drawn with
  wide jitter in hue, saturation and value and kept where the nearest reference is a training
  one of that name, so the cells bound most names' regions. The cells of ``HELD_OUT_SHADES``
  (easy-VQA's palette and CSS shades) are the held-out shade ranges: training never draws there,
  and the shifted split draws only there, close around those references.
* **backgrounds**: photos and textures that ship in packages (scikit-image, matplotlib) plus
  procedural ones (noise, gradients, stripes, tiles). The shifted split draws only held-out
  package photos, the held-out ``tiles`` texture and **Debian's opencv-doc sample photos, which
  are reserved for evaluation: no training material may use them** (``check_training_source``).
* **styles**: a shape with or without an outline, straight on the background or on a card,
  sticker or label of a light or dark tone, turned by up to 25°; the shifted split draws only
  the styles training never sees (labels, dark stickers).
* **finish**: blur, sensor noise and JPEG quality, shared by every split.

``val`` is the training distribution under other seeds: every choice (hyperparameters, rankings,
k, recipe steps) is made on it, never on ``shifted``.
"""

from __future__ import annotations

import colorsys
import functools
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter

from vllm_semclip.tiny.scenes import COLORS, Placed, draw_shape, load_photo

RGB = tuple[int, int, int]
SPLITS: tuple[str, ...] = ("train", "val", "shifted")
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")

# ---- shades ------------------------------------------------------------------------------------
EASY_VQA_SHADES: dict[str, RGB] = {  # read off easy-VQA's own images (CSS keywords, "lime" for green)
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0),
}


def _css(*names: str) -> tuple[RGB, ...]:
    return tuple(ImageColor.getrgb(n)[:3] for n in names)


TRAIN_SHADES: dict[str, tuple[RGB, ...]] = {
    "red": (COLORS["red"], *_css("crimson", "#d62728")),
    "green": (COLORS["green"], *_css("forestgreen", "seagreen", "limegreen")),
    "blue": (COLORS["blue"], *_css("royalblue", "mediumblue", "navy")),
    "yellow": (COLORS["yellow"], *_css("gold", "#ffe135")),
    "teal": (COLORS["teal"], *_css("darkcyan", "lightseagreen")),
    "brown": (COLORS["brown"], *_css("saddlebrown", "sienna")),
    "gray": (COLORS["gray"], *_css("dimgray", "slategray")),
    "black": (COLORS["black"], (35, 30, 30)),
}
HELD_OUT_SHADES: dict[str, tuple[RGB, ...]] = {  # easy-VQA's palette (less its gray: training's own) and more
    "red": (EASY_VQA_SHADES["red"], *_css("#e6194b")),
    "green": (EASY_VQA_SHADES["green"], *_css("green", "mediumseagreen")),
    "blue": (EASY_VQA_SHADES["blue"], *_css("dodgerblue")),
    "yellow": (EASY_VQA_SHADES["yellow"], *_css("#f0e130")),
    "teal": (EASY_VQA_SHADES["teal"], *_css("#006e78")),
    "brown": (EASY_VQA_SHADES["brown"], *_css("#7b3f00", "#964b00")),
    "gray": _css("darkgray", "silver"),
    "black": (EASY_VQA_SHADES["black"], (10, 10, 20)),
}


@dataclass(frozen=True)
class ShadeJitter:
    """How far a drawn shade may stray from its reference: hue (a fraction of the circle) either
    way, and the factors saturation and value are multiplied by."""

    hue: float
    saturation: tuple[float, float]
    value: tuple[float, float]


# training: wide enough that the cells, not the jitter, bound most names' regions (black's cell
# reaches grey 67, its jitter stops at 52); the shifted split stays close to its held-out references
TRAIN_JITTER = ShadeJitter(0.08, (0.4, 1.5), (0.5, 1.5))
HELD_OUT_JITTER = ShadeJitter(0.01, (0.9, 1.1), (0.92, 1.08))

# ---- backgrounds -------------------------------------------------------------------------------
TRAIN_PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
                                 "hubble_deep_field", "motorcycle_left", "brick", "grass", "gravel",
                                 "grace_hopper", "clock", "moon", "page", "minduka")
HELD_OUT_PHOTOS: tuple[str, ...] = ("retina", "coins")
OPENCV_PHOTOS: tuple[str, ...] = (  # Debian's opencv-doc: evaluation only
    "aero1.jpg", "aero3.jpg", "apple.jpg", "baboon.jpg", "building.jpg", "butterfly.jpg", "fruits.jpg",
    "home.jpg", "messi5.jpg", "orange.jpg", "starry_night.jpg", "squirrel_cls.jpg", "graf1.png",
    "leuvenA.jpg", "board.jpg", "HappyFish.jpg", "smarties.png", "rubberwhale1.png", "blox.jpg", "stuff.jpg",
)
TRAIN_TEXTURES: tuple[str, ...] = ("noise", "gradient", "stripes")
HELD_OUT_TEXTURES: tuple[str, ...] = ("tiles",)

# ---- styles ------------------------------------------------------------------------------------
CARD_KINDS: tuple[str, ...] = ("none", "card", "sticker", "label")
TRAIN_STYLES: tuple[tuple[str, str], ...] = (("none", "-"), ("card", "light"), ("card", "dark"), ("sticker", "light"))
HELD_OUT_STYLES: tuple[tuple[str, str], ...] = (("label", "light"), ("label", "dark"), ("sticker", "dark"))


class ReservedSourceError(ValueError):
    """Training material asked for a source that only evaluation may use."""


def background_source(name: str) -> str:
    """``opencv``, ``photo`` or ``texture``: where a background name comes from."""
    if name.startswith("opencv:"):
        return "opencv"
    if name.startswith("texture:"):
        return "texture"
    return "photo"


def check_training_source(name: str) -> None:
    """Refuse a background that only evaluation may draw (opencv-doc's photos, held-out ones)."""
    if background_source(name) == "opencv" or name in HELD_OUT_PHOTOS or name in {f"texture:{t}" for t in HELD_OUT_TEXTURES}:
        raise ReservedSourceError(f"background {name!r} is reserved for evaluation (the shifted split); "
                                  "no training material may use it")


@functools.lru_cache(maxsize=None)
def load_background_photo(name: str) -> Image.Image:
    """A background photo by name: scikit-image's data, matplotlib's samples, or ``opencv:FILE``."""
    if name.startswith("opencv:"):
        path = OPENCV_DATA / name.split(":", 1)[1]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the shifted split needs Debian's opencv-doc sample "
                                    "photos (apt-get install opencv-doc)")
        with Image.open(path) as im:
            return im.convert("RGB")
    if name == "minduka":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as f:
            return Image.open(f).convert("RGB")
    if name in ("retina", "coins", "clock", "moon", "page"):
        from skimage import data

        return Image.fromarray(getattr(data, name)()).convert("RGB")
    return load_photo(name)


def texture(kind: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A procedural background: ``noise``, ``gradient``, ``stripes`` or ``tiles``, in random colours."""
    w, h = size
    nprng = np.random.default_rng(rng.getrandbits(64))
    c0, c1 = (np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32) for _ in range(2))
    if kind == "noise":  # smooth value noise: a coarse random field, upscaled
        coarse = nprng.uniform(0, 255, size=(rng.randint(4, 24), rng.randint(4, 24), 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize(size, Image.BICUBIC)
    if kind == "gradient":
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        line = c0[None] * (1 - t[:, None]) + c1[None] * t[:, None]
        arr = np.broadcast_to(line[None], (h, w, 3)) if len(t) == w else np.broadcast_to(line[:, None], (h, w, 3))
        return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8))
    if kind == "stripes":
        period = rng.randint(max(8, w // 80), max(16, w // 10))
        coord = np.arange(w)[None, :] + np.arange(h)[:, None] * rng.uniform(-1, 1)
        mask = ((coord // period) % 2).astype(bool)
        arr = np.where(mask[..., None], c0, c1)
        return Image.fromarray(arr.astype(np.uint8))
    if kind == "tiles":
        n = rng.randint(4, 14)
        colors = nprng.uniform(0, 255, size=(n, n, 3)).astype(np.uint8)
        return Image.fromarray(colors).resize(size, Image.NEAREST)
    raise ValueError(f"unknown texture {kind!r}")


@dataclass(frozen=True)
class ObjectStyle:
    """How one shape is drawn: its card (``none`` for straight on the background), tone, outline, turn."""

    card: str
    tone: str
    outline: bool
    rotation: float
    card_color: RGB | None


@dataclass(frozen=True)
class RenderDistribution:
    """The distribution of one split (``train``, ``val`` or ``shifted``); see the module docstring."""

    split: str = "train"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {self.split!r}")

    @property
    def held_out(self) -> bool:
        return self.split == "shifted"

    @property
    def backgrounds(self) -> tuple[str, ...]:
        if self.held_out:
            return (*(f"opencv:{p}" for p in OPENCV_PHOTOS), *HELD_OUT_PHOTOS,
                    *(f"texture:{t}" for t in HELD_OUT_TEXTURES))
        return (*TRAIN_PHOTOS, *(f"texture:{t}" for t in TRAIN_TEXTURES))

    @property
    def shades(self) -> dict[str, tuple[RGB, ...]]:
        return HELD_OUT_SHADES if self.held_out else TRAIN_SHADES

    @property
    def styles(self) -> tuple[tuple[str, str], ...]:
        return HELD_OUT_STYLES if self.held_out else TRAIN_STYLES

    # ---- sampling ----------------------------------------------------------------------------
    @property
    def jitter(self) -> ShadeJitter:
        return HELD_OUT_JITTER if self.held_out else TRAIN_JITTER

    def color(self, name: str, rng: random.Random) -> RGB:
        """One shade of the colour ``name``: a reference shade of this split, jittered in HSV, redrawn
        until its nearest reference shade (of every split) is one of this split's references of
        ``name`` — so the names stay unambiguous, and training and the shifted split never draw
        from each other's shade ranges."""
        jitter = self.jitter
        for _ in range(200):
            r, g, b = (v / 255 for v in rng.choice(self.shades[name]))
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            h = (h + rng.uniform(-jitter.hue, jitter.hue)) % 1.0
            s = min(1.0, s * rng.uniform(*jitter.saturation))
            v = min(1.0, v * rng.uniform(*jitter.value))
            shade = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))
            nearest, held_out = nearest_reference(shade)
            if nearest == name and held_out == self.held_out:
                return shade
        raise RuntimeError(f"no unambiguous shade of {name!r} in 200 draws")

    def background(self, size: tuple[int, int], rng: random.Random,
                   zoom: tuple[float, float] = (0.5, 1.0)) -> tuple[Image.Image, str]:
        """A background of ``size`` and its name: a random crop of a photo (aspect kept; ``zoom``: the
        range of the share of the photo's side it spans) or a texture."""
        name = rng.choice(self.backgrounds)
        if not self.held_out:
            check_training_source(name)
        if name.startswith("texture:"):
            return texture(name.split(":", 1)[1], size, rng), name
        photo = load_background_photo(name)
        w, h = size
        pw, ph = photo.size
        scale = rng.uniform(*zoom)
        if w / h <= pw / ph:
            ch = max(1, int(ph * scale))
            cw = min(pw, max(1, int(ch * w / h)))
        else:
            cw = max(1, int(pw * scale))
            ch = min(ph, max(1, int(cw * h / w)))
        x0, y0 = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
        region = photo.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            region = region.transpose(Image.FLIP_LEFT_RIGHT)
        return region.resize(size, Image.BICUBIC), name

    def style(self, rng: random.Random) -> ObjectStyle:
        card, tone = rng.choice(self.styles)
        card_color = None
        if card != "none":
            hue, sat = rng.random(), rng.uniform(0.0, 0.25)
            val = rng.uniform(0.85, 1.0) if tone == "light" else rng.uniform(0.1, 0.3)
            card_color = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        return ObjectStyle(card, tone, rng.random() < 0.5, rng.uniform(-25, 25) if card != "none" else 0.0,
                           card_color)

    @staticmethod
    def footprint(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """The most a drawn object covers around its shape's box (the card reaches 60% further)."""
        x, y, w, h = box
        mx, my = round(0.6 * w), round(0.6 * h)
        return x - mx, y - my, w + 2 * mx, h + 2 * my

    def draw(self, image: Image.Image, shape: str, color: str, box: tuple[int, int, int, int],
             rng: random.Random, style: ObjectStyle | None = None) -> Placed:
        """Draw ``shape`` of colour name ``color`` filling ``box`` (x, y, w, h), on its card if any."""
        style = style or self.style(rng)
        x, y, w, h = box
        if style.card != "none":
            self._draw_card(image, box, style, rng)
        fill = self.color(color, rng)
        draw_shape(ImageDraw.Draw(image), shape, fill, box, outlined=style.outline)
        return Placed(shape, color, (x, y, w, h))

    def _draw_card(self, image: Image.Image, box: tuple[int, int, int, int], style: ObjectStyle,
                   rng: random.Random) -> None:
        x, y, w, h = box
        mx, my = round(w * rng.uniform(0.15, 0.4)), round(h * rng.uniform(0.15, 0.4))
        cw, ch = w + 2 * mx, h + 2 * my
        patch = Image.new("RGBA", (cw, ch), (0, 0, 0, 0))
        pen = ImageDraw.Draw(patch)
        color = (*style.card_color, 255)
        if style.card == "sticker":
            pen.ellipse([0, 0, cw - 1, ch - 1], fill=color)
        elif style.card == "label":
            edge = (40, 40, 40, 255) if style.tone == "light" else (220, 220, 220, 255)
            pen.rounded_rectangle([0, 0, cw - 1, ch - 1], radius=max(1, min(cw, ch) // 6), fill=color,
                                  outline=edge, width=max(1, min(cw, ch) // 30))
        else:
            pen.rectangle([0, 0, cw - 1, ch - 1], fill=color)
        turned = patch.rotate(style.rotation, resample=Image.BICUBIC, expand=True)
        cx, cy = x + w / 2, y + h / 2
        image.paste(turned, (round(cx - turned.width / 2), round(cy - turned.height / 2)), turned)

    def finish(self, image: Image.Image, rng: random.Random) -> tuple[Image.Image, int]:
        """Blur and sensor noise on the drawn scene, and the JPEG quality to save it at."""
        scale = max(image.size) / 2000
        if rng.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5) * scale))
        if rng.random() < 0.5:
            sigma = rng.uniform(2, 8)
            arr = np.asarray(image, dtype=np.float32)
            noise = np.random.default_rng(rng.getrandbits(64)).normal(0, sigma, arr.shape)
            image = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
        return image, rng.randint(45, 95)


def _redmean(a: RGB, b: RGB) -> float:
    """A cheap perceptual colour distance (the "redmean" weighting of RGB differences)."""
    rm = (a[0] + b[0]) / 2
    dr, dg, db = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    return ((2 + rm / 256) * dr * dr + 4 * dg * dg + (2 + (255 - rm) / 256) * db * db) ** 0.5


def nearest_reference(shade: RGB) -> tuple[str, bool]:
    """The colour name of the reference shade (training's and held-out alike) nearest to ``shade``,
    and whether that reference is a held-out one (``shade`` lies in a held-out shade range)."""
    return min((_redmean(shade, ref), name, held_out)
               for held_out, shades in ((False, TRAIN_SHADES), (True, HELD_OUT_SHADES))
               for name, refs in shades.items() for ref in refs)[1:]


def nearest_color_name(shade: RGB) -> str:
    """The name of the reference shade (training's and held-out alike) nearest to ``shade``."""
    return nearest_reference(shade)[0]


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    """The image as a JPEG of ``quality`` would give it back (training material sees what files give)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")
