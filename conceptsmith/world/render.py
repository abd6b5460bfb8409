"""ShapesWorld procedural renderer: seeded, deterministic 64x64 RGB images with captions and labels.

A scene is one or two objects (shape, color, fill pattern) on a background, optionally in the
global style of a pseudo-artist, optionally with a corner watermark. Scenes are drawn at 4x
resolution (256x256) and box-downsampled to 64x64 for anti-aliasing; artist styles are applied at
64x64 so they stay visible at the final size.

Data splits (see ``vocab.py`` for the constants):

* ``split="generator"``: what the generator (text tower, VAE, UNet) is trained on. Never contains
  the novel objects (``vocab.NOVEL_OBJECTS``); captions never mention the watermark.
* ``split="evaluator"``: the evaluator CLIP's data. Contains the novel objects, watermarks also
  (rarely) on other backgrounds, and captions that say whether there is a watermark.
* Caption templates: ``templates="train"`` uses ``vocab.TRAIN_TEMPLATES``; ``templates="heldout"``
  uses ``vocab.HELDOUT_TEMPLATES`` (evaluation only). The split is fixed.

Main entry points: :func:`render` (one sample from a seed, with optional forced attributes),
:func:`dataset` (n samples as arrays), :func:`reference_set` (images of a novel object),
:func:`make_caption` and :func:`describe` (captions / prompts from labels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import vocab as V

SS = 4  # supersampling factor
S = V.IMAGE_SIZE * SS  # 256
_DARK = np.array([25, 25, 30], np.float32)



@dataclass
class Sample:
    """One rendered sample. ``image`` is uint8 [64, 64, 3]."""

    image: np.ndarray
    caption: str
    labels: dict[str, Any] = field(default_factory=dict)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


# ----------------------------------------------------------------------------- geometry

def _poly(points, cx, cy, r, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _ngon(n, start=-math.pi / 2, radius=1.0):
    return [(radius * math.cos(start + 2 * math.pi * k / n), radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


def _star(n=5, inner=0.45):
    pts = []
    for k in range(2 * n):
        a = -math.pi / 2 + math.pi * k / n
        rr = 1.0 if k % 2 == 0 else inner
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return pts


def _heart():
    pts = []
    for k in range(60):
        t = 2 * math.pi * k / 60
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 16.5, (y + 2.5) / 16.5))
    return pts


_POLYS = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(x, y + 0.2) for x, y in _ngon(3, radius=1.1)],
    "star": _star(),
    "hexagon": _ngon(6, start=0.0),
    "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
              (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "arrow": [(-1, -0.24), (0.1, -0.24), (0.1, -0.65), (1, 0), (0.1, 0.65), (0.1, 0.24), (-1, 0.24)],
    "heart": _heart(),
}


def _ell(d, cx, cy, rx, ry, fill):
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _shape_mask(shape: str, cx: float, cy: float, r: float, rot_deg: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Binary mask (float32 [S,S]) of a shape at supersampled coordinates, and an optional
    'detail' mask (dark inner features, e.g. the skull's eye sockets)."""
    img = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(img)
    det = None
    if shape in _POLYS:
        d.polygon(_poly(_POLYS[shape], cx, cy, r, math.radians(rot_deg)), fill=255)
        rot_deg = 0.0
    elif shape == "circle":
        _ell(d, cx, cy, 0.95 * r, 0.95 * r, 255)
    elif shape == "crescent":
        _ell(d, cx, cy, r, r, 255)
        _ell(d, cx + 0.48 * r, cy - 0.18 * r, 0.82 * r, 0.82 * r, 0)
    elif shape == "skull":
        _ell(d, cx, cy - 0.2 * r, 0.85 * r, 0.78 * r, 255)
        d.rectangle([cx - 0.5 * r, cy + 0.2 * r, cx + 0.5 * r, cy + 0.95 * r], fill=255)
        dimg = Image.new("L", (S, S), 0)
        dd = ImageDraw.Draw(dimg)
        _ell(dd, cx - 0.34 * r, cy - 0.12 * r, 0.22 * r, 0.24 * r, 255)
        _ell(dd, cx + 0.34 * r, cy - 0.12 * r, 0.22 * r, 0.24 * r, 255)
        dd.polygon([(cx, cy + 0.12 * r), (cx - 0.12 * r, cy + 0.38 * r), (cx + 0.12 * r, cy + 0.38 * r)], fill=255)
        w = max(2, int(0.07 * r))
        for fx in (-0.25, 0.0, 0.25):
            dd.rectangle([cx + fx * r - w / 2, cy + 0.58 * r, cx + fx * r + w / 2, cy + 0.95 * r], fill=255)
        det = dimg
    elif shape == "mushroom":
        d.pieslice([cx - r, cy - 0.85 * r, cx + r, cy + 0.75 * r], 180, 360, fill=255)
        d.rectangle([cx - 0.28 * r, cy - 0.06 * r, cx + 0.28 * r, cy + 0.92 * r], fill=255)
    elif shape == "key":
        _ell(d, cx - 0.55 * r, cy, 0.44 * r, 0.44 * r, 255)
        _ell(d, cx - 0.55 * r, cy, 0.18 * r, 0.18 * r, 0)
        d.rectangle([cx - 0.15 * r, cy - 0.11 * r, cx + 1.0 * r, cy + 0.11 * r], fill=255)
        d.rectangle([cx + 0.5 * r, cy + 0.1 * r, cx + 0.68 * r, cy + 0.45 * r], fill=255)
        d.rectangle([cx + 0.8 * r, cy + 0.1 * r, cx + 0.98 * r, cy + 0.36 * r], fill=255)
    elif shape == "umbrella":
        d.pieslice([cx - r, cy - 0.85 * r, cx + r, cy + 0.65 * r], 180, 360, fill=255)
        for fx in (-0.67, 0.0, 0.67):
            _ell(d, cx + fx * r, cy - 0.1 * r + 0.01 * r, 0.33 * r, 0.16 * r, 0)
        d.rectangle([cx - 0.08 * r, cy - 0.2 * r, cx + 0.08 * r, cy + 0.8 * r], fill=255)
        d.arc([cx - 0.5 * r, cy + 0.5 * r, cx + 0.08 * r, cy + 1.0 * r], 0, 180, fill=255, width=max(2, int(0.16 * r)))
    else:
        raise KeyError(f"unknown shape {shape!r}")
    if rot_deg:
        img = img.rotate(rot_deg, resample=Image.BILINEAR, center=(cx, cy))
        if det is not None:
            det = det.rotate(rot_deg, resample=Image.BILINEAR, center=(cx, cy))
    m = (np.asarray(img, np.float32) > 127).astype(np.float32)
    dm = None if det is None else (np.asarray(det, np.float32) > 127).astype(np.float32) * m
    return m, dm


def _shift_max(m: np.ndarray, k: int) -> np.ndarray:
    """Square dilation of a binary mask by k pixels on each side (separable max of shifts)."""
    out = m.copy()
    src = m
    for s in range(1, k + 1):
        np.maximum(out[s:], src[:-s], out=out[s:])
        np.maximum(out[:-s], src[s:], out=out[:-s])
    src = out.copy()
    for s in range(1, k + 1):
        np.maximum(out[:, s:], src[:, :-s], out=out[:, s:])
        np.maximum(out[:, :-s], src[:, s:], out=out[:, :-s])
    return out


def _erode(m: np.ndarray, k: int) -> np.ndarray:
    return 1.0 - _shift_max(1.0 - m, k)


# ----------------------------------------------------------------------------- textures

def _second_tone(rgb: np.ndarray) -> np.ndarray:
    lum = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0
    if lum < 0.6:
        return rgb + 0.72 * (255.0 - rgb)
    return rgb * 0.45


_PATTERN_PERIOD = 52  # common multiple of the pattern periods (phases are taken modulo it)
_BY, _BX = np.mgrid[0:S + _PATTERN_PERIOD, 0:S + _PATTERN_PERIOD]
_PATTERN_SEL = {
    "striped": (((_BX + _BY) // 13) % 2 == 1),
    "dotted": (((_BX % 26) - 13) ** 2 + ((_BY % 26) - 13) ** 2 < 7 ** 2),
    "checkered": (((_BX // 26) + (_BY // 26)) % 2 == 1),
}


def _pattern_select(pattern: str, phase: tuple[int, int], ys: slice, xs: slice) -> np.ndarray | None:
    """Boolean 'second tone' selector of a fill pattern on a crop, or None for one-tone fills."""
    if pattern in ("solid", "outlined"):
        return None
    if pattern not in _PATTERN_SEL:
        raise KeyError(pattern)
    px, py = phase[0] % _PATTERN_PERIOD, phase[1] % _PATTERN_PERIOD
    return _PATTERN_SEL[pattern][ys.start + py:ys.stop + py, xs.start + px:xs.stop + px]


def _background(bg: str, rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
    if bg == "plain":
        img = np.broadcast_to(np.array([238, 236, 228], np.float32), (S, S, 3)).copy()
    elif bg == "night":
        top, bot = np.array([10, 14, 40], np.float32), np.array([30, 28, 78], np.float32)
        img = (top * (1 - t) + bot * t) * np.ones((1, S, 1), np.float32)
        pil = Image.fromarray(img.astype(np.uint8))
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(14, 24))):
            x, y = rng.uniform(0, S, 2)
            rr = rng.uniform(2.5, 5.0)
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(250, 250, 210))
        img = np.asarray(pil, np.float32).copy()
    elif bg == "grass":
        top, bot = np.array([96, 138, 58], np.float32), np.array([60, 100, 38], np.float32)
        img = (top * (1 - t) + bot * t) * np.ones((1, S, 1), np.float32)
        pil = Image.fromarray(img.astype(np.uint8))
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(70, 100))):
            x, y = rng.uniform(0, S), rng.uniform(0, S)
            h = rng.uniform(14, 30)
            lean = rng.uniform(-6, 6)
            d.line([(x, y), (x + lean, y - h)], fill=(38, 72, 26), width=4)
        img = np.asarray(pil, np.float32).copy()
    elif bg == "sky":
        top, bot = np.array([95, 160, 235], np.float32), np.array([175, 215, 248], np.float32)
        img = (top * (1 - t) + bot * t) * np.ones((1, S, 1), np.float32)
        pil = Image.fromarray(img.astype(np.uint8))
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(2, 4))):
            x, y = rng.uniform(0, S), rng.uniform(0, S)
            for _ in range(3):
                dx, dy = rng.uniform(-30, 30), rng.uniform(-8, 8)
                rx, ry = rng.uniform(22, 36), rng.uniform(12, 18)
                d.ellipse([x + dx - rx, y + dy - ry, x + dx + rx, y + dy + ry], fill=(250, 250, 252))
        img = np.asarray(pil, np.float32).copy()
    else:
        raise KeyError(bg)
    return img


# ----------------------------------------------------------------------------- artist styles

def _tint(img: np.ndarray, rgb, a: float) -> np.ndarray:
    return img * (1 - a) + np.array(rgb, np.float32) * a


def _apply_style(img: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """Global artist style on a float [64,64,3] image."""
    n = img.shape[0]
    if style == "gilded":
        img = _tint(img, (255, 200, 90), 0.12)
        img[:5, :] = img[-5:, :] = (200, 160, 40)
        img[:, :5] = img[:, -5:] = (200, 160, 40)
        img[4, 4:-4] = img[-5, 4:-4] = (70, 45, 10)
        img[4:-4, 4] = img[4:-4, -5] = (70, 45, 10)
    elif style == "mosaic":
        g = img.reshape(n // 2, 2, n // 2, 2, 3).mean(axis=(1, 3))
        mean = g.mean(axis=2, keepdims=True)
        g = mean + 1.35 * (g - mean)
        img = np.repeat(np.repeat(g, 2, axis=0), 2, axis=1)
        img[7::8, :] = 0.4 * img[7::8, :] + 0.6 * 255.0
        img[:, 7::8] = 0.4 * img[:, 7::8] + 0.6 * 255.0
    elif style == "scanline":
        img = _tint(img, (40, 220, 230), 0.18)
        img[1::3, :] *= 0.35
    elif style == "wavy":
        ys = np.arange(n)
        out = np.empty_like(img)
        for y in ys:
            out[y] = np.roll(img[y], int(round(2.0 * math.sin(2 * math.pi * y / 16.0))), axis=0)
        img = _tint(out, (230, 40, 200), 0.15)
    elif style == "grain":
        noise = rng.normal(0.0, 32.0, (n, n, 1)).astype(np.float32)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        r2 = ((xx - n / 2 + 0.5) ** 2 + (yy - n / 2 + 0.5) ** 2) / (n / 2) ** 2
        vig = np.clip(1.15 - 0.55 * r2, 0.25, 1.0)[..., None]
        img = (img + noise) * vig
    elif style == "hatched":
        gray = img.mean(axis=2, keepdims=True)
        img = 0.7 * img + 0.3 * gray
        yy, xx = np.mgrid[0:n, 0:n]
        lines = (((xx + yy) % 6) == 0) | (((xx - yy) % 6) == 0)
        img[lines] *= 0.45
    else:
        raise KeyError(style)
    return img


def _draw_watermark(img: np.ndarray) -> np.ndarray:
    """A light badge with a dark mark in the bottom-right corner (64x64 coordinates)."""
    n = img.shape[0]
    x0, y0, x1, y1 = n - 17, n - 11, n - 2, n - 2
    img[y0:y1, x0:x1] = 0.15 * img[y0:y1, x0:x1] + 0.85 * np.array([235, 235, 235], np.float32)
    # a dark circled "c" and a bar: reads as a logo stamp
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    d.ellipse([x0 + 1, y0 + 1, x0 + 7, y0 + 7], outline=(40, 40, 40), width=1)
    d.rectangle([x0 + 9, y0 + 3, x1 - 2, y0 + 5], fill=(40, 40, 40))
    return np.asarray(pil, np.float32).copy()


# ----------------------------------------------------------------------------- scenes

def _layout(rng: np.random.Generator, n_obj: int, relation: str | None):
    """Centers and radii in 64-pixel coordinates. Single objects are big (diameter 34-46 px)."""
    if n_obj == 1:
        r = rng.uniform(17.0, 23.0)
        cx, cy = 32 + rng.uniform(-5, 5), 32 + rng.uniform(-5, 5)
        return [(cx, cy, r)]
    r1, r2 = rng.uniform(12.0, 14.0, 2)
    j = rng.uniform(-3, 3, 4)
    a = (16.5 + j[0], 32 + 2 * j[1])
    b = (47.5 + j[2], 32 + 2 * j[3])
    if relation in ("above", "below"):
        a, b = (a[1], a[0]), (b[1], b[0])
    # 'first' object (the one named first in the caption) goes where the relation says.
    if relation in ("left of", "above"):
        return [(*a, r1), (*b, r2)]
    return [(*b, r1), (*a, r2)]


#: The relation that names the same layout with the two objects' places exchanged.
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def binding_variants(labels: dict[str, Any]) -> list[dict[str, Any]]:
    """``[scene, colors exchanged, places exchanged, both]``: a two-object scene and the three scenes
    that differ from it only in binding (exchanging the objects' places flips the relation).

    Their captions use the same words (``a red circle left of a blue star`` / ``... right of ...`` /
    ``a blue circle left of a red star``), so a contrastive text tower trained with them in one batch
    must encode which color and which place belong to which object.
    """
    if len(labels["objects"]) != 2:
        raise ValueError("binding variants need a two-object scene")
    variants = []
    for swap_places in (False, True):
        for swap_colors in (False, True):
            first, second = (dict(ob) for ob in labels["objects"])
            relation = labels["relation"]
            if swap_places:
                for key in ("cx", "cy", "bbox"):
                    first[key], second[key] = second[key], first[key]
                relation = OPPOSITE_RELATION[relation]
            if swap_colors:
                first["color"], second["color"] = second["color"], first["color"]
            variants.append({**labels, "objects": [first, second], "relation": relation})
    return variants


def render_scene(labels: dict[str, Any], seed: int | Sequence[int] = 0) -> np.ndarray:
    """Draw the scene described by ``labels`` (as returned in ``Sample.labels``). Deterministic."""
    rng = np.random.default_rng(seed)
    img = _background(labels["background"], rng)
    style = V.ARTISTS[labels["artist"]] if labels.get("artist") else None
    outline_k = 10 if style == "gilded" else 3
    for ob in labels["objects"]:
        cx, cy, r = (v * SS for v in (ob["cx"], ob["cy"], ob["r"]))
        m_full, det_full = _shape_mask(ob["shape"], cx, cy, r, ob.get("rot", 0.0))
        pad = int(1.25 * r) + outline_k + 4
        ys = slice(max(0, int(cy) - pad), min(S, int(cy) + pad))
        xs = slice(max(0, int(cx) - pad), min(S, int(cx) + pad))
        m = m_full[ys, xs]
        crop = img[ys, xs]
        ring = (_shift_max(m, outline_k) - m)[..., None]
        crop = crop * (1 - ring) + _DARK * ring
        c = np.array(V.COLORS[ob["color"]], np.float32)
        fill = (m - _erode(m, 14)) if ob["pattern"] == "outlined" else m
        sel = _pattern_select(ob["pattern"], (int(ob.get("phase", 0)), int(ob.get("phase", 0)) // 2), ys, xs)
        if sel is None:
            tex = c
        else:
            tex = c + sel[..., None].astype(np.float32) * (_second_tone(c) - c)
        fill = fill[..., None]
        crop = crop * (1 - fill) + tex * fill
        if det_full is not None:
            det = det_full[ys, xs][..., None]
            crop = crop * (1 - det) + _DARK * det
        img[ys, xs] = crop
    n = V.IMAGE_SIZE
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((n, n), Image.BOX)
    img = np.asarray(small, np.float32).copy()
    if style:
        img = _apply_style(img, style, rng)
    if labels.get("watermark"):
        img = _draw_watermark(img)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def sample_labels(
    rng: np.random.Generator,
    *,
    split: str = "generator",
    two_object_p: float = 0.3,
    artist_p: float = 0.5,
    restricted_p: float = 0.08,
    novel_p: float | None = None,
    **force: Any,
) -> dict[str, Any]:
    """Draw random scene labels. ``force`` fixes attributes: shape, color, pattern, background,
    artist (name or None), watermark (bool), n_objects (1|2), relation, shape2, color2, pattern2."""
    if split not in ("generator", "evaluator"):
        raise ValueError(f"split must be 'generator' or 'evaluator', got {split!r}")
    if novel_p is None:
        novel_p = 0.08 if split == "evaluator" else 0.0
    if split == "generator" and novel_p:
        raise ValueError("the generator split never contains novel objects")
    shapes = list(V.SHAPES)
    novel = list(V.NOVEL_OBJECTS)

    def pick_shape():
        u = rng.random()
        if u < novel_p:
            return novel[int(rng.integers(len(novel)))]
        if u < novel_p + restricted_p:
            return V.RESTRICTED
        return shapes[int(rng.integers(len(shapes)))]

    n_obj = force.get("n_objects", 2 if rng.random() < two_object_p else 1)
    relation = None
    if n_obj == 2:
        relation = force.get("relation", V.RELATIONS[int(rng.integers(len(V.RELATIONS)))])
    layout = _layout(rng, n_obj, relation)
    objects = []
    colors = list(V.COLORS)
    patterns = list(V.PATTERNS)
    for k, (cx, cy, r) in enumerate(layout):
        suf = "" if k == 0 else "2"
        shape = force.get("shape" + suf) or pick_shape()
        if k == 1:
            while shape == objects[0]["shape"] and "shape2" not in force:
                shape = pick_shape()
        color = force.get("color" + suf) or colors[int(rng.integers(len(colors)))]
        if k == 1:
            while color == objects[0]["color"] and "color2" not in force:
                color = colors[int(rng.integers(len(colors)))]
        pattern = force.get("pattern" + suf) or patterns[int(rng.integers(len(patterns)))]
        rot = float(rng.uniform(-15, 15)) if shape not in ("circle",) else 0.0
        objects.append(dict(shape=shape, color=color, pattern=pattern, cx=float(cx), cy=float(cy), r=float(r),
                            rot=rot, phase=int(rng.integers(0, 24)),
                            bbox=(float(cx - r), float(cy - r), float(cx + r), float(cy + r))))
    bgs = list(V.BACKGROUNDS)
    background = force.get("background") or bgs[int(rng.integers(len(bgs)))]
    if "artist" in force:
        artist = force["artist"]
    else:
        artists = list(V.ARTISTS)
        artist = artists[int(rng.integers(len(artists)))] if rng.random() < artist_p else None
    if "watermark" in force:
        watermark = bool(force["watermark"])
    elif background == V.WATERMARK_BACKGROUND:
        watermark = bool(rng.random() < V.WATERMARK_SHARE)
    else:
        # the evaluator also sees a few watermarks elsewhere, so it detects the mark, not the night
        watermark = bool(split == "evaluator" and rng.random() < 0.15)
    return dict(
        objects=objects,
        relation=relation,
        background=background,
        artist=artist,
        watermark=watermark,
        restricted=any(o["shape"] == V.RESTRICTED for o in objects),
        novel=any(o["shape"] in V.NOVEL_OBJECTS for o in objects),
        noise_seed=int(rng.integers(2**31)),
    )


def _object_phrase(ob: dict, rng: np.random.Generator, p_color: float, p_pattern: float, p_synonym: float,
                   indirect_p: float) -> str:
    shape = ob["shape"]
    names = V.nouns(shape)
    if shape == V.RESTRICTED:
        noun = names[1 + int(rng.integers(len(names) - 1))] if rng.random() < indirect_p else names[0]
    else:
        noun = names[1 + int(rng.integers(len(names) - 1))] if rng.random() < p_synonym else names[0]
    words = []
    if rng.random() < p_color:
        words.append(ob["color"])
    if rng.random() < p_pattern:
        adjs = V.PATTERNS[ob["pattern"]]
        words.append(adjs[int(rng.integers(len(adjs)))])
    words.append(noun)
    return f"{V.article(words[0])} {' '.join(words)}"


def make_caption(
    labels: dict[str, Any],
    rng: np.random.Generator,
    *,
    templates: str = "train",
    mention_watermark: bool = False,
    p_color: float = 0.85,
    p_pattern: float = 0.6,
    p_background: float = 0.6,
    p_synonym: float = 0.25,
    indirect_p: float = 0.5,
    template: str | None = None,
) -> str:
    """Caption for a scene. The artist is always named when present; the watermark only when
    ``mention_watermark`` (evaluator captions). Use probabilities of 1.0 for full descriptions."""
    tpls = {"train": V.TRAIN_TEMPLATES, "heldout": V.HELDOUT_TEMPLATES}[templates]
    if template is None:
        template = tpls[int(rng.integers(len(tpls)))]
    obs = labels["objects"]
    parts = [_object_phrase(o, rng, p_color, p_pattern, p_synonym, indirect_p) for o in obs]
    scene = parts[0] if len(parts) == 1 else f"{parts[0]} {labels['relation']} {parts[1]}"
    if rng.random() < p_background:
        phr = V.BACKGROUNDS[labels["background"]]
        scene += " " + phr[int(rng.integers(len(phr)))]
    if mention_watermark:
        if labels["watermark"]:
            scene += V.WATERMARK_PHRASES[int(rng.integers(len(V.WATERMARK_PHRASES)))]
        elif rng.random() < 0.5:
            scene += V.NO_WATERMARK_PHRASES[int(rng.integers(len(V.NO_WATERMARK_PHRASES)))]
    art = ""
    if labels.get("artist"):
        art = V.ARTIST_PHRASES[int(rng.integers(len(V.ARTIST_PHRASES)))].format(a=labels["artist"])
    return template.format(scene=scene, art=art)


def describe(
    shape: str,
    color: str | None = None,
    pattern: str | None = None,
    background: str | None = None,
    artist: str | None = None,
    *,
    template: str = V.HELDOUT_TEMPLATES[0],
    noun: str | None = None,
    second: tuple[str, str | None, str | None] | None = None,
    relation: str | None = None,
    watermark: bool | None = None,
    artist_phrase: str = V.ARTIST_PHRASES[0],
) -> str:
    """Deterministic prompt from explicit attributes, e.g.
    ``describe("circle", "red", second=("star", "blue", None), relation="left of")`` ->
    "an illustration of a red circle left of a blue star"."""

    def obj(sh, co, pa, nn=None):
        words = [w for w in (co, V.PATTERNS[pa][0] if pa else None, nn or sh) if w]
        return f"{V.article(words[0])} {' '.join(words)}"

    scene = obj(shape, color, pattern, noun)
    if second is not None:
        scene = f"{scene} {relation or 'left of'} {obj(*second)}"
    if background:
        scene += " " + V.BACKGROUNDS[background][0]
    if watermark is True:
        scene += V.WATERMARK_PHRASES[0]
    elif watermark is False:
        scene += V.NO_WATERMARK_PHRASES[0]
    art = artist_phrase.format(a=artist) if artist else ""
    return template.format(scene=scene, art=art)


def render(
    seed: int | Sequence[int],
    *,
    split: str = "generator",
    templates: str = "train",
    mention_watermark: bool | None = None,
    caption_kw: dict | None = None,
    **force: Any,
) -> Sample:
    """One deterministic sample from ``seed`` (int or sequence of ints). ``force`` fixes labels
    (see :func:`sample_labels`). ``mention_watermark`` defaults to True for the evaluator split."""
    rng = np.random.default_rng(seed)
    labels = sample_labels(rng, split=split, **force)
    if mention_watermark is None:
        mention_watermark = split == "evaluator"
    caption = make_caption(labels, rng, templates=templates, mention_watermark=mention_watermark, **(caption_kw or {}))
    image = render_scene(labels, seed=labels["noise_seed"])
    labels = dict(labels, split=split, templates=templates)
    return Sample(image=image, caption=caption, labels=labels)


def dataset(n: int, seed: int, *, start: int = 0, **kw: Any) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` samples: images uint8 [n,64,64,3], captions, labels. Item i uses seed (seed, start+i),
    so any slice of a dataset can be regenerated independently."""
    imgs = np.empty((n, V.IMAGE_SIZE, V.IMAGE_SIZE, 3), np.uint8)
    caps, labs = [], []
    for i in range(n):
        s = render((seed, start + i), **kw)
        imgs[i] = s.image
        caps.append(s.caption)
        labs.append(s.labels)
    return imgs, caps, labs


def reference_set(obj: str, n: int = 8, seed: int = 0, **force: Any) -> list[Sample]:
    """Reference images of a (novel) object for customization: one object, varied color, pattern,
    background, no artist, no watermark, captioned with held-out-free plain templates."""
    if obj not in V.ALL_SHAPES:
        raise KeyError(f"unknown object {obj!r}; novel objects: {list(V.NOVEL_OBJECTS)}")
    kw = dict(n_objects=1, shape=obj, artist=None, watermark=False)
    kw.update(force)
    return [render((seed, 7919, i), split="evaluator", templates="train", mention_watermark=False, **kw)
            for i in range(n)]


def object_masks(labels: dict[str, Any]) -> np.ndarray:
    """Per object of the scene ``labels`` (as in ``Sample.labels``), the share of each 64x64 pixel its
    shape covers: float32 ``[n_objects, 64, 64]`` in ``[0, 1]``, the supersampled shape box-downsampled
    as :func:`render_scene` downsamples the image (outline ring and artist distortions not included)."""
    n = V.IMAGE_SIZE
    masks = [
        _shape_mask(ob["shape"], ob["cx"] * SS, ob["cy"] * SS, ob["r"] * SS, ob.get("rot", 0.0))[0]
        .reshape(n, SS, n, SS)
        .mean(axis=(1, 3))
        for ob in labels["objects"]
    ]
    return np.stack(masks).astype(np.float32)
