"""A vectorised numpy rasteriser: (identity, scene, motion vectors) -> RGB frames and masks.

Every shape is an anti-aliased implicit region (ellipses, bands, superellipses) evaluated on all
pixels of a batch of frames at once; there is no per-pixel Python loop and no GPU. Head features
live in head-local coordinates (u, v): the face outline is the unit (super)ellipse, and a feature
at longitude theta / latitude phi on the head appears at u = sin(theta + yaw angle),
v = sin(phi + pitch angle), foreshortened by the cosines. That is what makes the side mark appear
only when the head turns, and what lets the probe read the pose back.

Image coordinates: x in [-1, 1] left to right, y in [-1, 1] top to bottom, pixel centres.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import scene as scn
from avatarv_jax.data.avatarworld.motion import MOTION_DIM, MOTION_FIELDS

MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024
YAW_RAD, PITCH_RAD, ROLL_RAD = 0.75, 0.35, 0.2   # angle at motion value 1
HEAD_Y = -0.10                                     # face centre height in the image
FRAME_CHUNK = 16

C = lambda *rgb: np.array(rgb, np.float32)
SKIN = [C(0.98, 0.87, 0.80), C(0.93, 0.75, 0.60), C(0.80, 0.59, 0.42), C(0.58, 0.39, 0.25),
        C(0.36, 0.23, 0.15)]
HAIR = [C(0.08, 0.07, 0.07), C(0.40, 0.23, 0.11), C(0.93, 0.79, 0.42), C(0.68, 0.26, 0.09),
        C(0.72, 0.72, 0.74)]
EYES = [C(0.42, 0.22, 0.07), C(0.15, 0.45, 0.95), C(0.15, 0.68, 0.28)]
LIPS = [C(0.93, 0.52, 0.58), C(0.82, 0.08, 0.14), C(0.45, 0.10, 0.32)]
FACE_ASPECT = (0.96, 0.78, 0.64, 0.90)    # rx / ry per face_shape
FACE_POWER = (2.0, 2.0, 2.0, 4.0)         # superellipse exponent (square jaw)
FACE_TAPER = (0.0, 0.32, 0.15, 0.0)       # chin narrowing
EYE_HEIGHT = (0.18, 0.12, 0.06)           # per eye_shape
EYE_HALF_WIDTH = (0.21, 0.25, 0.28)
BROW_THICK = (0.035, 0.09, 0.05)          # per brow_style
BROW_ARCH = (0.0, 0.0, 0.17)
BROW_HALF_WIDTH = (0.2, 0.28, 0.3)
MOUTH_HALF_WIDTH = (0.20, 0.33, 0.48)     # per mouth_width: apart under any rounding and smile
TEETH_WHITE = C(0.97, 0.96, 0.90)
GOLD = C(0.95, 0.75, 0.12)
BRACES = C(0.20, 0.45, 0.90)
MOUTH_DARK = C(0.22, 0.04, 0.07)
HEADBAND = C(0.88, 0.12, 0.58)
MARK_THETA, MARK_PHI = -1.6, 0.25

RENDERER_VERSION = 2
"""Written into data-set manifests. 2: lip rounding purses the lips instead of only narrowing
them (mouth widths no longer overlap); the mouth opens downwards and the nose sits a little
higher (an open mouth no longer covers it); the long nose is lit along its ridge."""


@dataclasses.dataclass(frozen=True)
class Rendered:
    frames: np.ndarray            # uint8 [T, H, W, 3]
    masks: dict[str, np.ndarray]  # "face", "mouth", "eyes": bool [T, H, W]


def _soft(d: np.ndarray, scale) -> np.ndarray:
    """Coverage of a region given a signed inside-distance ``d`` and pixels per unit ``scale``."""
    return np.clip(d * scale + 0.5, 0.0, 1.0)


def _ellipse(u, v, u0, v0, a, b, pu, pv):
    """Anti-aliased ellipse (centre u0, v0; radii a, b) in units where a pixel is (pu, pv).

    The edge uses the implicit-function distance (1 - q) / |grad q| in pixels, so long thin
    ellipses get a one-pixel edge all round rather than a blur at their ends.
    """
    a = np.maximum(a, 1e-4)
    b = np.maximum(b, 1e-4)
    du, dv = (u - u0) / a, (v - v0) / b
    q = np.sqrt(du * du + dv * dv) + 1e-6
    grad = np.sqrt((du * (pu / a)) ** 2 + (dv * (pv / b)) ** 2) / q
    return np.clip((1.0 - q) / np.maximum(grad, 1e-6) + 0.5, 0.0, 1.0)


def _over(img: np.ndarray, alpha: np.ndarray, color) -> None:
    """Composite ``color`` over ``img`` in place with coverage ``alpha``."""
    img += alpha[..., None] * (color - img)


def background(scene: scn.Scene, res: int) -> np.ndarray:
    """float32 [H, W, 3]: the static backdrop of a scene."""
    return _background(scene.background_kind, scene.background_color, scene.background_color2, res)


@functools.lru_cache(maxsize=64)
def _background(kind: str, name1: str, name2: str, res: int) -> np.ndarray:
    c1, c2 = C(*scn.BACKGROUND_COLORS[name1]), C(*scn.BACKGROUND_COLORS[name2])
    g = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    y, x = g[:, None], g[None, :]
    px = res / 2.0
    if kind == "plain wall":
        t = np.zeros((res, res), np.float32)
    elif kind == "gradient wall":
        t = np.broadcast_to((y + 1) / 2, (res, res))
    elif kind == "striped wall":
        t = _soft(np.sin(2 * np.pi * x / 0.3) * 0.3 / (2 * np.pi), px) + 0 * y
    elif kind == "dotted wall":
        gx, gy = (x / 0.25) % 1.0 - 0.5, (y / 0.25) % 1.0 - 0.5
        t = _soft(0.06 - 0.25 * np.sqrt(gx ** 2 + gy ** 2), px)
    elif kind == "checkered wall":
        t = _soft(np.sin(np.pi * x / 0.3) * np.sin(np.pi * y / 0.3) * 0.1, px)
    elif kind == "room with a window":
        inside = _soft(np.minimum(np.minimum(x - 0.35, 0.9 - x), np.minimum(y + 0.85, -0.15 - y)), px)
        frame = _soft(np.minimum(np.minimum(x - 0.31, 0.94 - x), np.minimum(y + 0.89, -0.11 - y)), px)
        bars = _soft(0.02 - np.minimum(np.abs(x - 0.625), np.abs(y + 0.5)), px)
        img = np.broadcast_to(c1, (res, res, 3)).copy()
        _over(img, frame, c2)
        _over(img, inside * (1 - bars), C(0.80, 0.91, 1.0))
        return img * (1.0 - 0.12 * (y[..., None] + 1) / 2)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    t = np.asarray(t, np.float32)[..., None]
    img = c1 * (1 - t) + c2 * t
    return (img * (1.0 - 0.12 * (y[..., None] + 1) / 2)).astype(np.float32)


class _Head:
    """Per-frame pose and head-local coordinates over the pixels of one box."""

    def __init__(self, person: idn.Identity, scene: scn.Scene, motion: np.ndarray, x, y, res):
        col = lambda n: motion[:, MOTION_FIELDS.index(n)][:, None, None].astype(np.float32)
        a = person.attributes
        self.shape = int(a[idn.ATTRIBUTE_NAMES.index("face_shape")])
        self.ry = np.float32(scene.head_scale)
        self.rx = np.float32(scene.head_scale * FACE_ASPECT[self.shape])
        self.yaw = col("head_yaw") * YAW_RAD
        self.pitch = col("head_pitch") * PITCH_RAD
        roll = col("head_roll") * ROLL_RAD
        self.cx = scene.head_x + 0.06 * self.ry * col("head_yaw")
        self.cy = HEAD_Y + 0.06 * self.ry * col("head_pitch")
        dx, dy = x - self.cx, y - self.cy
        cr, sr = np.cos(roll), np.sin(roll)
        self.u = (cr * dx + sr * dy) / self.rx
        self.v = (-sr * dx + cr * dy) / self.ry
        pix = 2.0 / res
        self.pu, self.pv = pix / self.rx, pix / self.ry
        taper = 1.0 - FACE_TAPER[self.shape] * np.maximum(self.v, 0) ** 2
        p = FACE_POWER[self.shape]
        self.n = (np.abs(self.u / taper) ** p + np.abs(self.v) ** p) ** (1.0 / p)
        self.motion = {n: col(n) for n in MOTION_FIELDS}

    def lon(self, theta):
        t = theta + self.yaw
        return np.sin(t), np.cos(t)

    def lat(self, phi):
        t = phi + self.pitch
        return np.sin(t), np.cos(t)

    def ell(self, u0, v0, a, b):
        return _ellipse(self.u, self.v, u0, v0, a, b, self.pu, self.pv)


def _head_box(scene: scn.Scene, motion: np.ndarray, res: int) -> tuple[slice, slice]:
    """Pixel rows/cols that contain the head (hair, ears, bun) in every frame of the batch."""
    s = scene.head_scale
    yaw = motion[:, MOTION_FIELDS.index("head_yaw")]
    x0 = scene.head_x + 0.06 * s * yaw.min() - 1.45 * s
    x1 = scene.head_x + 0.06 * s * yaw.max() + 1.45 * s
    y0, y1 = HEAD_Y - 1.75 * s, HEAD_Y + 1.25 * s
    to_px = lambda t: int(np.clip(np.floor((t + 1) / 2 * res), 0, res))
    return slice(to_px(y0), to_px(y1) + 1), slice(to_px(x0), to_px(x1) + 1)


def render(person: idn.Identity, scene: scn.Scene, motion: np.ndarray, resolution: int) -> Rendered:
    """Frames and masks for a [T, MOTION_DIM] motion sequence (rendered in chunks of frames)."""
    motion = np.asarray(motion, np.float32)
    if motion.ndim != 2 or motion.shape[1] != MOTION_DIM:
        raise ValueError(f"motion must be [T, {MOTION_DIM}], got {motion.shape}")
    if not (MIN_RESOLUTION <= resolution <= MAX_RESOLUTION) or resolution % 2:
        raise ValueError(f"resolution must be even and in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], "
                         f"got {resolution}")
    t_frames = motion.shape[0]
    frames = np.empty((t_frames, resolution, resolution, 3), np.uint8)
    masks = {k: np.zeros((t_frames, resolution, resolution), bool) for k in ("face", "mouth", "eyes")}
    for s in range(0, t_frames, FRAME_CHUNK):
        part = slice(s, min(t_frames, s + FRAME_CHUNK))
        img, m = _render_chunk(person, scene, motion[part], resolution)
        frames[part] = img
        for k in masks:
            masks[k][part] = m[k]
    return Rendered(frames=frames, masks=masks)


def _render_chunk(person, scene, motion, res):
    t = motion.shape[0]
    g = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    img = np.broadcast_to(background(scene, res), (t, res, res, 3)).copy()
    attr = dict(zip(idn.ATTRIBUTE_NAMES, (int(i) for i in person.attributes)))
    skin = SKIN[attr["skin_tone"]]
    hair = HAIR[attr["hair_color"]]
    lx, ly = scn.LIGHT_DIRECTIONS[scene.light_direction]

    # Body, neck and long hair live in image coordinates over the whole frame.
    s = np.float32(scene.head_scale)
    hx = np.float32(scene.head_x)
    y, x = g[None, :, None], g[None, None, :]
    pix = res / 2.0
    _body(img, scene, skin, hx, s, x, y, pix, lx)
    if attr["hair_style"] == 2:  # long hair falls behind the neck and over the shoulders
        full = _Head(person, scene, motion, x, y, res)
        back = _soft(np.minimum(1.22 - np.abs(full.u), 1.55 - full.v), pix * full.rx)
        back *= np.where(full.v < 0, _soft(1.22 - full.n, pix * full.rx), 1.0)
        _over(img, back, hair * 0.85)
    _neck(img, scene, skin, hx, s, x, y, pix, lx)

    rows, cols = _head_box(scene, motion, res)
    box = img[:, rows, cols]
    head = _Head(person, scene, motion, g[None, cols][:, None, :], g[None, rows][:, :, None], res)
    masks_box = _draw_head(box, head, attr, skin, hair, lx, ly, person.texture_seed)
    img[:, rows, cols] = box
    masks = {}
    for k, mb in masks_box.items():
        full_mask = np.zeros((t, res, res), bool)
        full_mask[:, rows, cols] = mb
        masks[k] = full_mask
    img *= C(*scn.LIGHT_TINTS[scene.light_tint])
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), masks


def _body(img, scene, skin, hx, s, x, y, pix, lx):
    cloth = C(*scn.CLOTHING_COLORS[scene.clothing_color])
    shade = (1.0 + 0.08 * lx * (x - hx)).astype(np.float32)[..., None]
    top = HEAD_Y + 1.15 * s
    body = _ellipse(x, y, hx, HEAD_Y + 2.35 * s, 1.9 * s, 1.2 * s, 1 / pix, 1 / pix)
    _over(img, body, cloth * shade)
    kind = scene.clothing_kind
    if kind == "suit":
        depth = (y - top) / (0.95 * s)
        vee = _soft(np.minimum(0.38 * s * (1 - depth) - np.abs(x - hx), y - top), pix) * body
        _over(img, vee, C(0.95, 0.95, 0.95))
        tie = _soft(np.minimum(0.05 * s - np.abs(x - hx), 0.8 * s - np.abs(y - top - 0.3 * s)), pix)
        _over(img, tie * vee, C(0.15, 0.15, 0.2))
    elif kind == "hoodie":
        hood = _ellipse(x, y, hx, top + 0.05 * s, 0.62 * s, 0.28 * s, 1 / pix, 1 / pix)
        _over(img, hood, cloth * 0.75)
        for side in (-1, 1):
            string = _soft(np.minimum(0.018 * s - np.abs(x - hx - side * 0.14 * s),
                                      0.28 * s - np.abs(y - top - 0.5 * s)), pix)
            _over(img, string, C(0.95, 0.95, 0.95))
    elif kind == "collared shirt":
        for side in (-1, 1):
            ang = side * 0.6
            dx, dy = x - hx - side * 0.2 * s, y - top - 0.08 * s
            ru = np.cos(ang) * dx + np.sin(ang) * dy
            rv = -np.sin(ang) * dx + np.cos(ang) * dy
            _over(img, _ellipse(ru, rv, 0, 0, 0.24 * s, 0.08 * s, 1 / pix, 1 / pix),
                  C(0.97, 0.97, 0.97))


def _neck(img, scene, skin, hx, s, x, y, pix, lx):
    top, bottom = HEAD_Y + 0.5 * s, HEAD_Y + 1.2 * s
    w = 0.33 * s
    neck = _soft(np.minimum(w - np.abs(x - hx), np.minimum(y - top, bottom - y)), pix)
    if scene.clothing_kind == "t-shirt":
        neck = np.maximum(neck, _ellipse(x, y, hx, bottom, 0.34 * s, 0.16 * s, 1 / pix, 1 / pix))
    shade = (0.82 + 0.06 * lx * (x - hx) / s).astype(np.float32)[..., None]
    _over(img, neck, skin * shade)
    if scene.clothing_kind == "turtleneck":
        cloth = C(*scn.CLOTHING_COLORS[scene.clothing_color])
        collar = _soft(np.minimum(w * 1.15 - np.abs(x - hx), np.minimum(y - (top + 0.3 * s),
                                                                         bottom + 0.1 * s - y)), pix)
        _over(img, collar, cloth * 0.9)


def _draw_head(img, h: _Head, attr, skin, hair, lx, ly, texture_seed) -> dict[str, np.ndarray]:
    u, v, pu, pv = h.u, h.v, h.pu, h.pv
    mo = h.motion
    shade = 1.0 + 0.13 * (lx * u + ly * v) - 0.08 * np.minimum(h.n, 1.0) ** 4
    skin_px = skin * shade[..., None]

    # Ears and earrings sit behind the face outline.
    for side in (-1.0, 1.0):
        _over(img, h.ell(side * 1.0, -0.05, 0.16, 0.22), skin * 0.9)
        if attr["accessory"] == 2:
            _over(img, h.ell(side * 1.02, 0.3, 0.1 * h.ry / h.rx, 0.1), GOLD)

    face = _soft(1.0 - h.n, 1.0 / pu)
    _over(img, face, skin_px)

    # Skin texture, placed on the front of the face so it turns with the head.
    su, _ = h.lon(0.0)
    tu = u - su
    texture = attr["skin_texture"]
    if texture == 1:
        p1, p2 = np.random.default_rng(texture_seed).uniform(0, 6.3, 2)
        spots = np.clip((np.sin(19 * tu + p1) * np.sin(19 * v + p2) - 0.35) * 4, 0, 1)
        cheeks = _soft(np.minimum(0.4 - np.abs(np.abs(tu) - 0.45), 0.28 - np.abs(v - 0.12)), 1 / pv)
        _over(img, spots * cheeks * face * 0.9, skin * 0.45)
    elif texture == 2:
        for side in (-1.0, 1.0):
            _over(img, h.ell(su + side * 0.5, 0.22, 0.25, 0.15) * face * 0.8, C(0.93, 0.30, 0.38))
    elif texture == 3:
        grain = 0.6 + 0.4 * np.sin(57 * u + 3.1) * np.sin(61 * v + 1.7)
        jaw = _soft(v - 0.22, 1 / pv) * face * 0.75 * grain
        _over(img, jaw, C(0.2, 0.2, 0.25))

    # The side mark: behind the silhouette until the head turns to the image's right.
    mu, mcu = h.lon(MARK_THETA)
    mv, mcv = h.lat(MARK_PHI)
    mark_on = face * np.clip(mcu * 20.0, 0.0, 1.0)  # zero while behind the silhouette
    mcu = np.maximum(mcu, 0.0)
    mark = attr["mark"]
    if mark == 1:
        _over(img, h.ell(mu, mv, 0.30 * mcu, 0.13 * mcv) * mark_on, C(0.22, 0.12, 0.06))
    elif mark == 2:
        _over(img, h.ell(mu, mv, 0.42 * mcu, 0.05 * mcv) * mark_on, C(0.98, 0.66, 0.66))
    elif mark == 3:
        _over(img, h.ell(mu, mv, 0.40 * mcu, 0.18 * mcv) * mark_on, C(0.05, 0.35, 0.45))
        _over(img, h.ell(mu, mv, 0.18 * mcu, 0.08 * mcv) * mark_on, C(0.55, 0.9, 0.95))

    # Nose: three shapes that differ in outline and shading enough to read at 64 px (a round
    # tip with a highlight, a broad dark bar, a long bridge from between the eyes), all above
    # the top of the lips even with the mouth wide open.
    nu, ncu = h.lon(0.0)
    nv, _ = h.lat(0.06)
    nose = attr["nose"]
    dark = skin_px * 0.5
    if nose == 0:  # button: a small round tip with a bright highlight
        _over(img, h.ell(nu, nv + 0.06, 0.13 * ncu, 0.11), dark)
        _over(img, h.ell(nu, nv + 0.03, 0.06 * ncu, 0.05), skin_px * 0.45 + 0.55)
        spread, size = 0.04, 0.025
    elif nose == 1:  # wide: a broad dark bar with wide-set nostrils
        _over(img, h.ell(nu, nv + 0.08, 0.34 * ncu, 0.075), dark)
        spread, size = 0.2, 0.05
    else:  # long: a bridge down from between the eyes to a narrow tip, lit along its ridge
        _over(img, h.ell(nu, nv - 0.12, 0.10 * ncu, 0.30), dark)
        _over(img, h.ell(nu, nv - 0.12, 0.045 * ncu, 0.26), skin_px * 0.45 + 0.55)
        _over(img, h.ell(nu, nv + 0.12, 0.09 * ncu, 0.06), dark)
        spread, size = 0.05, 0.025
    for side in (-1.0, 1.0):
        _over(img, h.ell(nu + side * spread * ncu, nv + 0.13, size * ncu, 0.025), skin * 0.25)

    # Mouth: lips, the opening and the teeth pattern (only seen when open).
    mu0, mcu0 = h.lon(0.0)
    opening, rounding, smile = mo["mouth_open"], mo["lip_round"], mo["smile"]
    # The jaw drops as the mouth opens: the opening grows mostly downwards, so even a wide,
    # rounded mouth opened fully stays below the nose.
    mv0 = h.lat(0.45)[0] + 0.13 * opening
    # Rounding purses the lips (fuller lips, a narrower and rounder opening) and narrows the
    # mouth only a little, so the three mouth widths stay apart under any rounding and smile
    # (width factor 0.88-1.06): a narrow rounded mouth never looks like a medium spread one.
    hw = MOUTH_HALF_WIDTH[attr["mouth_width"]] * mcu0 * (1 - 0.12 * rounding) * (1 + 0.06 * smile)
    du = u - mu0
    dv = v - mv0 + 0.12 * smile * (du / hw) ** 2
    oh = 0.015 + 0.26 * opening
    lips = _ellipse(du, dv, 0, 0, hw, 0.065 + 0.035 * rounding + oh, pu, pv)
    _over(img, lips, LIPS[attr["lip_color"]] * shade[..., None])
    inner = _ellipse(du, dv, 0, 0, 0.82 * (1 - 0.35 * rounding) * hw, oh, pu, pv)
    _over(img, inner, MOUTH_DARK)
    teeth_line = -oh + 1.1 * oh  # the teeth fill the upper 55 % of the opening
    # teeth only inside the real opening: a shut mouth (opening 0) shows none of them
    teeth = inner * _soft(teeth_line - dv, 1 / pv) * np.clip(opening * 20.0, 0.0, 1.0)
    tcol = np.broadcast_to(TEETH_WHITE, teeth.shape + (3,)).copy()
    kind = attr["teeth"]
    if kind == 1:
        _over(tcol, _soft(0.055 - np.abs(du), 1 / pu), MOUTH_DARK)
    elif kind == 2:
        _over(tcol, _soft(0.08 - np.abs(du - 0.12 * mcu0), 1 / pu), GOLD)
    elif kind == 3:
        band = _soft(0.3 * oh - np.abs(dv + 0.45 * oh), 1 / pv)
        _over(tcol, band, BRACES)
    _over(img, teeth, tcol)

    # Eyes: dark rim, white, iris, pupil, then the lid closing from above.
    eyes_mask = np.zeros(u.shape, bool)
    brow_color = hair * min(1.0, 0.18 / float(hair @ C(0.3, 0.59, 0.11)))  # dark enough to see
    eh = EYE_HEIGHT[attr["eye_shape"]]
    iris = EYES[attr["eye_color"]]
    lids = []
    for side in (-1.0, 1.0):
        eu, ecu = h.lon(side * 0.42)
        ev, ecv = h.lat(-0.08)
        ecu = np.maximum(ecu, 0.0)
        ew, ehh = EYE_HALF_WIDTH[attr["eye_shape"]] * ecu, eh * ecv
        rim = h.ell(eu, ev, ew + 0.025, ehh + 0.025)
        eyes_mask |= rim > 0.5
        white = h.ell(eu, ev, ew, ehh)
        _over(img, rim, C(0.12, 0.08, 0.08))
        _over(img, white, C(0.97, 0.97, 0.95))
        iu = eu + 0.45 * ew * mo["gaze_x"]
        iv = ev + 0.35 * ehh * mo["gaze_y"]
        ri = 0.1 * ecv
        _over(img, h.ell(iu, iv, ri * h.ry / h.rx * ecu, ri) * white, iris)
        _over(img, h.ell(iu, iv, 0.45 * ri * h.ry / h.rx * ecu, 0.45 * ri) * white, C(0.03, 0.03, 0.03))
        lid_edge = ev - ehh - 0.03 + (2 * ehh + 0.06) * mo["blink"]
        lid = _soft(lid_edge - v, 1 / pv) * rim
        _over(img, lid, skin_px * 0.93)
        lids.append((eu, ev, ecu, ecv))

        # Brows follow the hair colour and lift with the brow field.
        bu = eu
        bv = h.lat(-0.30)[0] - 0.10 * mo["brow"]
        bw = BROW_HALF_WIDTH[attr["brow_style"]] * ecu
        k = BROW_ARCH[attr["brow_style"]]
        curve = bv - k * (1 - ((u - bu) / np.maximum(bw, 1e-3)) ** 2)
        brow = (_soft(bw - np.abs(u - bu), 1 / pu)
                * _soft(BROW_THICK[attr["brow_style"]] - np.abs(v - curve), 1 / pv))
        _over(img, brow, brow_color)

    # Hair in front of the forehead.
    style = attr["hair_style"]
    hairline = -0.66 + 0.3 * u ** 2
    thick = {0: 0.03, 1: 0.08, 2: 0.09, 3: 0.07, 4: 0.16}[style]
    outline = 1.0 + thick
    if style == 4:
        outline = outline + 0.05 * np.sin(9 * np.arctan2(v, u))
        hairline = hairline + 0.04 * np.sin(14 * u)
    cap = _soft(outline - h.n, 1 / pu) * _soft(hairline - v, 1 / pv)
    strands = (0.9 + 0.1 * np.sin(40 * u + 3 * v))[..., None]
    if style == 0:
        _over(img, cap * 0.45, hair * strands)
    else:
        _over(img, cap, hair * strands)
    if style == 3:
        _over(img, h.ell(0.0, -1.18, 0.3 * h.ry / h.rx, 0.28), hair * 0.92)
    face_mask = (face > 0.5) & (cap < 0.5)

    if attr["accessory"] == 3:
        band = _soft(0.07 - np.abs(v - (-0.8 + 0.15 * u ** 2)), 1 / pv) * _soft(1.05 + thick - h.n, 1 / pu)
        _over(img, band, HEADBAND)
    elif attr["accessory"] == 1:
        for eu, ev, ecu, ecv in lids:
            outer = h.ell(eu, ev, 0.31 * ecu, 0.22 * ecv)
            inner_ring = h.ell(eu, ev, 0.31 * ecu - 0.05, 0.22 * ecv - 0.05)
            _over(img, outer * (1 - inner_ring), C(0.07, 0.07, 0.09))
            _over(img, inner_ring * 0.15, C(0.75, 0.85, 0.95))
        (lu, lv, lcu, _), (ru_, _, rcu, _) = lids
        left_edge, right_edge = lu + 0.31 * lcu, ru_ - 0.31 * rcu
        bridge = (_soft(0.025 - np.abs(v - lv + 0.04), 1 / pv)
                  * _soft(np.minimum(u - left_edge, right_edge - u) + 0.02, 1 / pu))
        _over(img, bridge, C(0.07, 0.07, 0.09))

    mouth_mask = lips > 0.5
    return {"face": face_mask | mouth_mask | (eyes_mask & (face > 0.5)), "mouth": mouth_mask,
            "eyes": eyes_mask}
