"""AvatarWorld: identities, scenes, motion, rendering and masks."""

import dataclasses

import numpy as np
import pytest

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import render as rnd
from avatarv_jax.data.avatarworld import scene as scn
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.avatarworld.clip import frames_for_vae, make_clip


@pytest.fixture(scope="module")
def clip():
    return make_clip(seed=3, identity_id=5, scene_id=9, language="en", duration_s=3.0,
                     resolution=64)


def test_identity_is_a_pure_function_of_its_id():
    a, b = idn.sample_identity(17), idn.sample_identity(17)
    assert np.array_equal(a.attributes, b.attributes) and np.array_equal(a.style, b.style)
    assert a.voice == b.voice and a.texture_seed == b.texture_seed
    people = [idn.sample_identity(i) for i in range(200)]
    distinct = {tuple(p.attributes) for p in people}
    assert len(distinct) == 200  # 14 attributes: collisions are astronomically rare
    for k, n in enumerate(idn.NUM_CLASSES):  # every class of every attribute occurs
        assert set(int(p.attributes[k]) for p in people) == set(range(n))
    assert all(((p.style >= 0) & (p.style <= 1)).all() for p in people)


def test_split_rule_and_ids_in_split():
    assert [idn.split_of(i) for i in range(8)] == ["train"] * 7 + ["heldout"]
    held = idn.ids_in_split("heldout", 3)
    assert held == [7, 15, 23]
    assert 7 not in idn.ids_in_split("train", 10)
    with pytest.raises(ValueError, match="split must be"):
        idn.ids_in_split("test", 1)
    with pytest.raises(ValueError, match="non-negative"):
        idn.split_of(-1)


def test_style_physical_round_trip():
    style = idn.sample_identity(4).style
    phys = idn.style_to_physical(style)
    assert set(phys) == set(idn.DYNAMIC_STYLE_FIELDS)
    for name, (lo, hi) in idn.DYNAMIC_STYLE_RANGES.items():
        assert lo <= phys[name] <= hi
    np.testing.assert_allclose(idn.style_from_physical(phys), style, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        idn.style_to_physical(np.zeros(3))


def test_clip_is_deterministic_by_seed(clip):
    again = make_clip(seed=3, identity_id=5, scene_id=9, language="en", duration_s=3.0,
                      resolution=64)
    assert np.array_equal(clip.frames, again.frames)
    assert np.array_equal(clip.audio, again.audio)
    assert np.array_equal(clip.motion, again.motion)
    for k in clip.masks:
        assert np.array_equal(clip.masks[k], again.masks[k])
    other = make_clip(seed=4, identity_id=5, scene_id=9, language="en", duration_s=3.0,
                      resolution=64)
    assert not np.array_equal(clip.audio, other.audio)


def test_clip_shapes_and_ranges(clip):
    t = 75
    assert clip.frames.shape == (t, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.motion.shape == (t, mo.MOTION_DIM) and clip.motion.dtype == np.float32
    assert 8 <= mo.MOTION_DIM <= 16 and len(mo.MOTION_FIELDS) == mo.MOTION_DIM
    assert (clip.motion >= mo.MOTION_LOW).all() and (clip.motion <= mo.MOTION_HIGH).all()
    assert clip.audio.shape == (t * 640,) and clip.audio.dtype == np.float32
    assert all(m.shape == (t, 64, 64) and m.dtype == bool for m in clip.masks.values())
    assert clip.static_attributes.shape == (idn.NUM_ATTRIBUTES,)
    assert clip.dynamic_style.shape == (idn.DYNAMIC_STYLE_DIM,)
    assert clip.split == "train" and make_clip(0, 7, 0, num_frames=1, resolution=64).split == "heldout"
    assert frames_for_vae(2.0) == 49 and (frames_for_vae(3.3) - 1) % 4 == 0


def test_attributes_and_style_do_not_depend_on_the_scene():
    a = make_clip(1, identity_id=2, scene_id=3, num_frames=5, resolution=64)
    b = make_clip(1, identity_id=2, scene_id=4, num_frames=5, resolution=64)
    c = make_clip(1, identity_id=6, scene_id=3, num_frames=5, resolution=64)
    assert np.array_equal(a.static_attributes, b.static_attributes)
    assert np.array_equal(a.dynamic_style, b.dynamic_style)
    assert a.caption == c.caption and a.caption != b.caption
    # the background far from the person is the same whoever stands in the scene
    assert np.array_equal(a.frames[:, :5, :5], c.frames[:, :5, :5])
    # the caption never names the person's look
    body_words = ("hair", "eye", "skin", "face", "nose", "lip", "teeth", "glasses", "mark")
    for i in range(40):
        cap = scn.sample_scene(i).caption().lower()
        assert not [w for w in body_words if w in cap], cap


def test_mouth_is_shut_in_silence(clip):
    silent = speech.silent_frames(clip.audio)
    assert 5 < silent.sum() < len(silent) - 5  # the clip has pauses and speech
    opening = mo.field(clip.motion, "mouth_open")
    assert (opening[silent] == 0).all()
    assert opening[~silent].mean() > 0.2
    # and visibly so: the mouth mask is smallest where the audio is silent
    area = clip.masks["mouth"].sum(axis=(1, 2))
    assert area[silent].mean() < area[~silent].mean()


def _render_one(person, place, **fields):
    m = np.zeros((1, mo.MOTION_DIM), np.float32)
    for k, v in fields.items():
        m[0, mo.MOTION_FIELDS.index(k)] = v
    return rnd.render(person, place, m, 128)


def _dilate(mask, r=1):
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


@pytest.mark.parametrize("identity_id", [0, 3, 11])
def test_masks_cover_the_features_they_name(identity_id):
    person, place = idn.sample_identity(identity_id), scn.sample_scene(identity_id)
    shut = _render_one(person, place)
    opened = _render_one(person, place, mouth_open=0.8)
    changed = np.abs(shut.frames[0].astype(int) - opened.frames[0]).max(-1) > 0
    assert changed.sum() > 20
    assert not (changed & ~_dilate(opened.masks["mouth"][0])).any()

    blink = _render_one(person, place, blink=1.0, gaze_x=0.8)
    changed = np.abs(shut.frames[0].astype(int) - blink.frames[0]).max(-1) > 0
    assert changed.sum() > 10
    assert not (changed & ~_dilate(shut.masks["eyes"][0])).any()

    face, mouth, eyes = (shut.masks[k][0] for k in ("face", "mouth", "eyes"))
    assert (mouth <= face).all() and (eyes <= face).all()
    # two eyes side by side, above the mouth
    ys, xs = np.nonzero(eyes)
    my, _ = np.nonzero(mouth)
    assert ys.mean() < my.mean()
    left, right = xs < xs.mean(), xs >= xs.mean()
    assert left.sum() > 5 and right.sum() > 5
    # the face mask is mostly skin
    skin = rnd.SKIN[person.attribute("skin_tone")] * 255
    tint = np.array(scn.LIGHT_TINTS[place.light_tint])
    median = np.median(shut.frames[0][face], axis=0)
    np.testing.assert_allclose(median, skin * tint, atol=40)


def test_teeth_need_an_open_mouth_and_the_mark_a_turned_head():
    base = idn.sample_identity(0)
    attrs = base.attributes.copy()
    k_teeth, k_mark = idn.ATTRIBUTE_NAMES.index("teeth"), idn.ATTRIBUTE_NAMES.index("mark")

    def variant(**changes):
        a = attrs.copy()
        for k, v in changes.items():
            a[idn.ATTRIBUTE_NAMES.index(k)] = v
        return dataclasses.replace(base, attributes=a)

    place = scn.sample_scene(2)
    even, gold = variant(teeth=0), variant(teeth=2)
    assert attrs[k_teeth] in range(4) and attrs[k_mark] in range(4)
    same = lambda p, q, **f: np.array_equal(_render_one(p, place, **f).frames,
                                            _render_one(q, place, **f).frames)
    assert same(even, gold, mouth_open=0.0)
    assert not same(even, gold, mouth_open=0.8)
    no_mark, mole = variant(mark=0), variant(mark=1)
    assert same(no_mark, mole, head_yaw=0.0)
    assert same(no_mark, mole, head_yaw=-1.0)
    assert not same(no_mark, mole, head_yaw=mo.MARK_VISIBLE_YAW)


def _changed_pixels(a, b, level=24):
    """Pixels where two uint8 frames differ by more than ``level`` in some channel."""
    return int((np.abs(a.astype(int) - b.astype(int)).max(-1) > level).sum())


@pytest.mark.parametrize("identity_id", [0, 1, 4])
def test_every_static_attribute_is_visible_at_the_probes_resolution(identity_id):
    """Each pair of classes of every attribute changes clearly many pixels of a 64 px frame
    (where the attribute can be seen: mouth open for the teeth, head turned for the mark)."""
    person, place = idn.sample_identity(identity_id), scn.sample_scene(identity_id)
    m = np.zeros((1, mo.MOTION_DIM), np.float32)
    m[0, mo.MOTION_FIELDS.index("mouth_open")] = 0.8
    m[0, mo.MOTION_FIELDS.index("head_yaw")] = 0.8
    for a, name in enumerate(idn.ATTRIBUTE_NAMES):
        frames = []
        for k in range(idn.NUM_CLASSES[a]):
            attrs = person.attributes.copy()
            attrs[a] = k
            frames.append(rnd.render(dataclasses.replace(person, attributes=attrs), place, m,
                                     64).frames[0])
        for i in range(len(frames)):
            for j in range(i + 1, len(frames)):
                assert _changed_pixels(frames[i], frames[j]) >= 5, (name, i, j)


@pytest.mark.parametrize("identity_id", [0, 1, 3, 4, 5])
def test_nose_variants_differ_clearly_in_a_frontal_64px_frame(identity_id):
    """button / wide / long: at least 9 clearly changed pixels between any two, on any skin."""
    person, place = idn.sample_identity(identity_id), scn.sample_scene(identity_id)
    a = idn.ATTRIBUTE_NAMES.index("nose")
    m = np.zeros((1, mo.MOTION_DIM), np.float32)
    frames = []
    for k in range(3):
        attrs = person.attributes.copy()
        attrs[a] = k
        frames.append(rnd.render(dataclasses.replace(person, attributes=attrs), place, m,
                                 64).frames[0])
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert _changed_pixels(frames[i], frames[j]) >= 9, (i, j)


@pytest.mark.parametrize("identity_id", [0, 3, 6])
def test_mouth_widths_stay_apart_under_rounding_and_smile(identity_id):
    """The widest-drawn narrow mouth (spread, smiling) is narrower than the narrowest-drawn
    medium one (rounded, no smile), and so on up: rounding cannot pass one width off as another.
    Rounding itself shows: a rounded mouth has fuller lips than a spread one of the same width."""
    person, place = idn.sample_identity(identity_id), scn.sample_scene(identity_id)
    a = idn.ATTRIBUTE_NAMES.index("mouth_width")

    def mouth(width_class, **fields):
        attrs = person.attributes.copy()
        attrs[a] = width_class
        mask = _render_one(dataclasses.replace(person, attributes=attrs), place,
                           mouth_open=0.3, **fields).masks["mouth"][0]
        cols, rows = np.nonzero(mask.any(0))[0], np.nonzero(mask.any(1))[0]
        return cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1

    for k in (0, 1):
        widest = mouth(k, lip_round=0.0, smile=1.0)[0]
        narrowest_next = mouth(k + 1, lip_round=1.0, smile=0.0)[0]
        assert widest + 3 <= narrowest_next, (k, widest, narrowest_next)   # 128 px frames
    spread, rounded = mouth(1, lip_round=0.0), mouth(1, lip_round=1.0)
    assert rounded[1] >= spread[1] + 2, (spread, rounded)


def test_open_mouth_changes_many_pixels_at_64px():
    """Opening the mouth fully changes the mouth region by several pixel rows at 64 px."""
    person, place = idn.sample_identity(2), scn.sample_scene(2)
    m = np.zeros((2, mo.MOTION_DIM), np.float32)
    m[1, mo.MOTION_FIELDS.index("mouth_open")] = 1.0
    r = rnd.render(person, place, m, 64)
    assert _changed_pixels(r.frames[0], r.frames[1]) >= 70
    rows = lambda mask: np.nonzero(mask.any(1))[0]
    assert len(rows(r.masks["mouth"][1])) >= len(rows(r.masks["mouth"][0])) + 7


def test_motion_follows_the_style():
    audio = make_clip(0, 1, 1, duration_s=8.0, resolution=64).audio
    low = np.zeros(idn.DYNAMIC_STYLE_DIM, np.float32)
    high = np.ones(idn.DYNAMIC_STYLE_DIM, np.float32)
    m_low = mo.motion_from_audio(audio, low, np.random.default_rng(0))
    m_high = mo.motion_from_audio(audio, high, np.random.default_rng(0))
    track = speech.mouth_track(audio)
    lo_gain, hi_gain = idn.DYNAMIC_STYLE_RANGES["mouth_gain"]
    np.testing.assert_allclose(mo.field(m_low, "mouth_open"), np.clip(lo_gain * track, 0, 1),
                               atol=1e-6)
    np.testing.assert_allclose(mo.field(m_high, "mouth_open"), np.clip(hi_gain * track, 0, 1),
                               atol=1e-6)
    assert mo.field(m_high, "head_pitch").std() > 2 * mo.field(m_low, "head_pitch").std()
    assert mo.field(m_high, "smile").mean() > mo.field(m_low, "smile").mean() + 0.5
    assert (mo.field(m_high, "blink") >= 0.5).sum() > (mo.field(m_low, "blink") >= 0.5).sum()


def test_render_rejects_bad_input():
    person, place = idn.sample_identity(0), scn.sample_scene(0)
    with pytest.raises(ValueError, match="motion must be"):
        rnd.render(person, place, np.zeros((2, 3)), 64)
    with pytest.raises(ValueError, match="resolution must be even"):
        rnd.render(person, place, np.zeros((1, mo.MOTION_DIM)), 65)
    with pytest.raises(ValueError, match="unknown language"):
        make_clip(0, 0, 0, language="xx", num_frames=1, resolution=64)


def test_render_resolutions_agree():
    """A 256 px frame box-averaged to 64 px looks like the 64 px render."""
    person, place = idn.sample_identity(8), scn.sample_scene(8)
    m = mo.random_motion(np.random.default_rng(1), 2)
    small = rnd.render(person, place, m, 64).frames.astype(np.float32)
    big = rnd.render(person, place, m, 256).frames.astype(np.float32)
    down = big.reshape(2, 64, 4, 64, 4, 3).mean(axis=(2, 4))
    assert np.abs(small - down).mean() < 6.0
