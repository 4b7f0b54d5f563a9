"""QC snapshots: PNGs parse, are small, deterministic, show overlays where the mask is, and are
orientation-correct (RAS reorientation + side labels) whatever the storage order of the volume."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cohortseg.qc import snapshots as S


def _rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _colour_pixels(rgb, colour, tol=2):
    want = np.round(np.asarray(colour) * 255).astype(int)
    return (np.abs(rgb - want) <= tol).all(axis=-1)


def _non_grey(rgb):
    return ~((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2]))


def _volume(shape=(48, 48, 12), zooms=(1.0, 1.0, 3.0), seed=0):
    """Smooth anatomy-like volume in RAS storage order, with its affine."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img = 100 + 80 * np.exp(-((x - 24) ** 2 + (y - 24) ** 2) / 300.0) + rng.normal(0, 3, shape)
    aff = np.diag([*zooms, 1.0])
    aff[:3, 3] = [-(s - 1) * zz / 2 for s, zz in zip(shape, zooms)]
    return img.astype(np.float32), aff, (x, y, z)


def _blob_mask(grid, centre, r=4):
    x, y, z = grid
    m = (np.hypot(x - centre[0], y - centre[1]) <= r) & (z >= 2) & (z <= 9)
    return m.astype(np.uint8)


def test_mosaic_png_parses_size_and_is_small(tmp_path):
    img, aff, grid = _volume()
    mask = _blob_mask(grid, (30, 24))
    out = tmp_path / "m.png"
    snap = S.mosaic(img, mask, aff, out, view="axial", zoom="cord", n=12, title="sub-01")
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.size == snap.size
        w, h = im.size
    assert 300 <= w <= 1400 and 200 <= h <= 1400
    assert 2_000 < out.stat().st_size < 400_000
    assert len(snap.slices) == 8  # slices 2..9 contain the mask (fewer than n)
    assert snap.slices == list(range(2, 10))
    assert not list(tmp_path.glob(".*part*")), "atomic write left a temporary file"


def test_mosaic_selects_n_slices_spread_over_the_mask(tmp_path):
    img, aff, grid = _volume(shape=(32, 32, 40), zooms=(1, 1, 1))
    x, y, z = grid
    mask = ((np.hypot(x - 16, y - 16) <= 3) & (z >= 5) & (z <= 34)).astype(np.uint8)
    snap = S.mosaic(img, mask, aff, tmp_path / "m.png", n=6)
    assert len(snap.slices) == 6
    assert snap.slices[0] == 5 and snap.slices[-1] == 34
    assert snap.slices == sorted(snap.slices)


def test_mosaic_is_deterministic(tmp_path):
    img, aff, grid = _volume()
    mask = _blob_mask(grid, (30, 24))
    a = S.mosaic(img, mask, aff, tmp_path / "a.png", title="x").path.read_bytes()
    b = S.mosaic(img, mask, aff, tmp_path / "b.png", title="x").path.read_bytes()
    assert a == b


@pytest.mark.parametrize("radiological", [False, True])
def test_contour_colour_is_where_the_mask_is(tmp_path, radiological):
    """Mask on the patient's right and anterior: contour pixels on the 'R' side, in the top half."""
    img, aff, grid = _volume()
    mask = _blob_mask(grid, (38, 34), r=3)  # RAS: high x = right, high y = anterior
    snap = S.mosaic(img, mask, aff, tmp_path / "m.png", view="axial", zoom=None, n=1,
                    radiological=radiological)
    rgb = _rgb(snap.path)
    red = _colour_pixels(rgb, S.MASK_COLOR)
    assert red.sum() > 20, "no contour pixels in the mask colour"
    ys, xs = np.nonzero(red)
    w = rgb.shape[1]
    title_px = 32
    panel_mid_y = title_px + (rgb.shape[0] - title_px) / 2
    assert ys.mean() < panel_mid_y, "anterior must be at the top of an axial slice"
    on_right = xs.mean() > w / 2
    assert on_right == (not radiological)
    assert snap.sides["right" if not radiological else "left"] == "R"
    # overlay colours appear nowhere except the contour: the anatomy is pure grey
    assert (_non_grey(rgb) & ~red).sum() == 0


def test_no_colour_without_mask_and_empty_mask_noted(tmp_path):
    img, aff, _ = _volume()
    snap = S.mosaic(img, None, aff, tmp_path / "none.png", zoom=None)
    assert _non_grey(_rgb(snap.path)).sum() == 0
    snap = S.mosaic(img, np.zeros(img.shape, np.uint8), aff, tmp_path / "empty.png", zoom="cord")
    assert snap.note == "empty mask"
    assert snap.slices == list(range(1, 11))  # spread over the volume, edge slices skipped
    assert _non_grey(_rgb(snap.path)).sum() == 0


def _flip_storage(img, mask, aff):
    """Same world content stored differently: x and y flipped (LPS) and axes permuted (z, x, y)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    flip[1, 3] = img.shape[1] - 1
    img2, mask2 = img[::-1, ::-1, :], mask[::-1, ::-1, :]
    aff2 = aff @ flip  # voxel (i', j', k) -> voxel (n-1-i', m-1-j', k) -> world
    perm = [2, 0, 1]
    img3 = np.transpose(img2, perm)
    mask3 = np.transpose(mask2, perm)
    p = np.zeros((4, 4))
    p[3, 3] = 1
    for new_ax, old_ax in enumerate(perm):
        p[old_ax, new_ax] = 1
    aff3 = aff2 @ p
    return img3, mask3, aff3


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_display_does_not_depend_on_storage_order(tmp_path, view):
    img, aff, grid = _volume()
    mask = _blob_mask(grid, (36, 30), r=3)
    img3, mask3, aff3 = _flip_storage(img, mask, aff)
    assert img3.shape != img.shape
    a = S.mosaic(img, mask, aff, tmp_path / "ras.png", view=view, zoom="cord", n=4)
    b = S.mosaic(img3, mask3, aff3, tmp_path / "other.png", view=view, zoom="cord", n=4)
    assert a.slices == b.slices
    assert np.array_equal(_rgb(a.path), _rgb(b.path))


def test_side_labels_per_view(tmp_path):
    img, aff, grid = _volume()
    mask = _blob_mask(grid, (24, 24))
    sides = {v: S.mosaic(img, mask, aff, tmp_path / f"{v}.png", view=v, n=2).sides
             for v in ("axial", "coronal", "sagittal")}
    assert sides["axial"] == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    assert sides["coronal"] == {"left": "L", "right": "R", "top": "S", "bottom": "I"}
    assert sides["sagittal"] == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    rad = S.mosaic(img, mask, aff, tmp_path / "rad.png", view="axial", n=2, radiological=True)
    assert (rad.sides["left"], rad.sides["right"]) == ("R", "L")


def test_side_letters_are_drawn(tmp_path, monkeypatch):
    """The L/R/A/P letters are on the panel, one box at the middle of each border: the pixels that
    differ from a letter-less render form exactly four blobs, there."""
    from scipy import ndimage

    img, aff, grid = _volume()
    mask = _blob_mask(grid, (24, 24))
    rgb = _rgb(S.mosaic(img, mask, aff, tmp_path / "a.png", n=1, zoom=None).path)
    monkeypatch.setattr(S, "_side_labels", lambda *a, **k: None)
    bare = _rgb(S.mosaic(img, mask, aff, tmp_path / "b.png", n=1, zoom=None).path)
    assert rgb.shape == bare.shape
    lab, n = ndimage.label(ndimage.binary_closing((rgb != bare).any(axis=-1), iterations=2))
    assert n == 4
    h, w = rgb.shape[:2]
    cy, cx = np.array(ndimage.center_of_mass(np.ones_like(lab), lab, range(1, 5))).T
    left, right, top, bottom = np.argmin(cx), np.argmax(cx), np.argmin(cy), np.argmax(cy)
    assert len({left, right, top, bottom}) == 4
    assert cx[left] < 0.1 * w and cx[right] > 0.9 * w and abs(cy[left] - cy[right]) < 3
    assert abs(cx[top] - w / 2) < 0.05 * w and abs(cx[bottom] - w / 2) < 0.05 * w and cy[bottom] > 0.9 * h
    assert cy[top] < cy[left] < cy[bottom]
    sizes = ndimage.sum(np.ones_like(lab), lab, range(1, 5))
    assert sizes.max() < 0.01 * h * w  # letter boxes, not a shifted panel


def test_labels_get_distinct_colours(tmp_path):
    img, aff, grid = _volume()
    x, y, z = grid
    lab = np.zeros(img.shape, np.uint8)
    lab[(np.hypot(x - 24, y - 24) <= 10) & (z > 1) & (z < 10)] = 1
    lab[(np.hypot(x - 24, y - 24) <= 4) & (z > 1) & (z < 10)] = 2
    snap = S.mosaic(img, lab, aff, tmp_path / "lab.png", zoom="brain", n=4)
    rgb = _rgb(snap.path)
    assert _colour_pixels(rgb, S.LABEL_COLORS[0]).sum() > 20
    assert _colour_pixels(rgb, S.LABEL_COLORS[1]).sum() > 20


def test_fill_mode_and_views(tmp_path):
    img, aff, grid = _volume()
    mask = _blob_mask(grid, (24, 24))
    for view in ("sagittal", "coronal"):
        snap = S.mosaic(img, mask, aff, tmp_path / f"{view}.png", view=view, contour=False, n=3)
        assert _non_grey(_rgb(snap.path)).sum() > 20
    with pytest.raises(ValueError):
        S.mosaic(img, mask, aff, tmp_path / "x.png", view="oblique")
    with pytest.raises(ValueError):
        S.mosaic(img, mask[:-1], aff, tmp_path / "x.png")


def test_lesion_crops(tmp_path):
    img, aff, grid = _volume(shape=(48, 48, 24), zooms=(1, 1, 1))
    x, y, z = grid
    lab = np.zeros(img.shape, np.uint8)
    for cx, cy, cz, r in [(10, 10, 10, 2), (30, 30, 12, 3), (40, 12, 5, 1)]:
        lab[np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) <= r] = 1
    snap = S.lesion_crops(img, lab, aff, tmp_path / "les.png", max_lesions=2, size_mm=16)
    rgb = _rgb(snap.path)
    assert _colour_pixels(rgb, S.MASK_COLOR).sum() > 10
    assert snap.size[0] >= 200 and snap.path.stat().st_size < 200_000
    none = S.lesion_crops(img, np.zeros(img.shape), aff, tmp_path / "none.png")
    assert none.note == "no lesions" and none.path.is_file()


def test_registration_check(tmp_path):
    from scipy import ndimage

    img, aff, _ = _volume(shape=(40, 40, 30), zooms=(1, 1, 1))
    moving = ndimage.shift(img, (2, -1, 0), order=1)
    snap = S.registration_check(moving, img, tmp_path / "reg.png", affine=aff, n=3)
    assert _colour_pixels(_rgb(snap.path), S.EDGE_COLOR).sum() > 30
    with pytest.raises(ValueError):
        S.registration_check(moving[:-1], img, tmp_path / "bad.png", affine=aff)


def test_nifti_inputs_and_thumbnail(tmp_path):
    import nibabel as nib

    img, aff, grid = _volume()
    mask = _blob_mask(grid, (24, 24))
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(mask, aff), tmp_path / "mask.nii.gz")
    a = S.mosaic(tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz", None, tmp_path / "a.png")
    b = S.mosaic(img, mask, aff, tmp_path / "b.png")
    assert np.array_equal(_rgb(a.path), _rgb(b.path))
    th = S.thumbnail(a.path, tmp_path / "t.png", width=160)
    with Image.open(th) as im:
        w, h = im.size
    assert w == 160
    assert abs(h / w - a.size[1] / a.size[0]) < 0.02
    assert th.stat().st_size < 60_000
