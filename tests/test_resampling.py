"""Synthetic geometry tests for cohortseg.science.resampling and cohortseg.science.metrics (no ../shared needed).

The phantom is defined physically: a cylinder of radius R along world S-I (plus, where needed, a
small marker rod left-anterior of it), sampled at the voxel centres of each test grid. Every grid
(LAS, RAS, PSR, rows flipped, oblique) therefore shows the same object, and the expected areas are
computed by hand: pi R^2 in axial planes, pi R^2 / cos(tilt) in planes tilted by `tilt`.
"""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from cohortseg.errors import InputError
from cohortseg.science.metrics import area_per_slice, dice, inplane_area_mm2, volume_mm3
from cohortseg.science.resampling import (axial_grid_affine, fov_mask, resample_like,
                                  slices_to_native, through_plane_axis, to_axial_slices)

R = 5.0  # mm
CENTRE = np.array([3.0, -7.0, 20.0])  # world mm, cylinder axis passes through it along S
MARKER = CENTRE + np.array([-9.0, 8.0, 0.0])  # left (-x) and anterior (+y) of the cylinder
R_MARKER = 1.5


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _affine(columns, shape, centre=CENTRE) -> np.ndarray:
    """Affine with the given linear columns whose FOV centre lies at `centre`."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, dtype=float)
    a[:3, 3] = centre - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def phantom(shape, affine, marker: bool = False) -> nib.Nifti1Image:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    d = np.hypot(xyz[..., 0] - CENTRE[0], xyz[..., 1] - CENTRE[1])
    data = (d < R).astype(np.float32)
    if marker:
        dm = np.hypot(xyz[..., 0] - MARKER[0], xyz[..., 1] - MARKER[1])
        data[dm < R_MARKER] = 2.0
    return nib.Nifti1Image(data, affine)


# Same physical geometry stored four ways (0.5 x 0.5 mm in-plane, 3 mm slices, 64 x 64 x 5).
LAS = _affine(np.diag([-0.5, 0.5, 3.0]), (64, 64, 5))
RAS = _affine(np.diag([0.5, 0.5, 3.0]), (64, 64, 5))
LPS_ROWS_FLIPPED = _affine(np.diag([-0.5, -0.5, 3.0]), (64, 64, 5))
PSR_COLS = np.array([[0, 0, 0.5], [-0.5, 0, 0], [0, 3.0, 0]])  # axis0 -> P, axis1 -> S, axis2 -> R
PSR = _affine(PSR_COLS, (64, 5, 64))
TILT = 20.0  # degrees between the slice normal and S-I
OBLIQUE = _affine(_rot("z", 30) @ _rot("x", TILT) @ np.diag([-0.5, 0.5, 3.0]), (64, 64, 5))

GEOMETRIES = {
    "LAS": ((64, 64, 5), LAS, 1.0),
    "RAS": ((64, 64, 5), RAS, 1.0),
    "rows_flipped": ((64, 64, 5), LPS_ROWS_FLIPPED, 1.0),
    "PSR": ((64, 5, 64), PSR, 1.0),
    "oblique": ((64, 64, 5), OBLIQUE, 1.0 / math.cos(math.radians(TILT))),
}


# ----------------------------------------------------------------------------- axis detection


def test_through_plane_axis_for_common_orientations():
    assert through_plane_axis(LAS) == 2
    assert through_plane_axis(RAS) == 2
    assert through_plane_axis(PSR) == 1  # sagittal storage: S-I is the second voxel axis
    spr = _affine([[0, 0, 1.0], [0, -1.0, 0], [1.0, 0, 0]], (5, 64, 64))
    assert through_plane_axis(spr) == 0
    assert through_plane_axis(OBLIQUE) == 2
    # voxel size must not bias the choice: huge in-plane voxels, thin slices
    assert through_plane_axis(np.diag([-10.0, 10.0, 0.1, 1.0])) == 2


def test_axial_grid_is_canonical_left_anterior():
    for name, (shape, aff, _) in GEOMETRIES.items():
        g, t = axial_grid_affine(aff, shape)
        assert np.allclose(np.linalg.norm(g[:3, :2], axis=0), 0.25), name
        assert g[0, 0] < 0, f"{name}: first slice-grid axis must run towards Left"
        assert g[1, 1] > 0, f"{name}: second slice-grid axis must run towards Anterior"
        assert np.allclose(g[:3, 2], aff[:3, t]), name  # slice step = native slice step


# ----------------------------------------------------------------------------- areas


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_disc_area_after_axial_resampling(name):
    shape, aff, factor = GEOMETRIES[name]
    img = phantom(shape, aff)
    slices, grid = to_axial_slices(img)
    assert slices.dtype == np.float32 and slices.shape == (5, 200, 200)
    json.dumps(grid)  # JSON-serialisable
    assert grid["through_axis"] == grid["si_axis"] == through_plane_axis(aff)
    assert grid["slice_thickness_mm"] == pytest.approx(3.0)
    expected = math.pi * R ** 2 * factor  # 78.54 mm^2, or 83.58 mm^2 for the 20 deg tilt
    area_fine = slices.sum(axis=(1, 2)) * 0.25 * 0.25
    np.testing.assert_allclose(area_fine, expected, rtol=0.03)
    # native area through the generic metric agrees (same sampling, linear interpolation)
    area_native = area_per_slice(img.get_fdata(), aff, grid["through_axis"])
    np.testing.assert_allclose(area_native, expected, rtol=0.03)
    np.testing.assert_allclose(area_fine, area_native, rtol=0.01)


def test_slices_identical_whatever_the_storage_orientation():
    ref, _ = to_axial_slices(phantom((64, 64, 5), LAS, marker=True))
    # marker (value 2) must appear left (+p) and anterior (+q) of the cylinder centre
    p, q = np.nonzero(ref[2] > 1.5)
    cp, cq = np.nonzero((ref[2] > 0.5) & (ref[2] < 1.5))
    assert p.mean() > cp.mean() + 20 and q.mean() > cq.mean() + 20
    for name in ("RAS", "rows_flipped", "PSR"):
        shape, aff, _ = GEOMETRIES[name]
        s, _ = to_axial_slices(phantom(shape, aff, marker=True))
        np.testing.assert_allclose(s, ref, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_round_trip_recovers_phantom(name):
    shape, aff, _ = GEOMETRIES[name]
    img = phantom(shape, aff)
    slices, grid = to_axial_slices(img)
    back = slices_to_native(slices, grid, img)
    assert back.shape == shape and back.dtype == np.float32
    truth = img.get_fdata() > 0.5
    assert dice(back > 0.5, truth) > 0.95
    # a binary mask made in the fine grid (threshold there) also maps back faithfully
    back_bin = slices_to_native((slices > 0.5).astype(np.float32), grid, img)
    assert dice(back_bin > 0.5, truth) > 0.95


def test_native_voxels_outside_the_crop_get_zero():
    # 1 mm voxels, 80 mm FOV: the 200 x 0.25 = 50 mm crop covers only the centre
    aff = _affine(np.diag([-1.0, 1.0, 3.0]), (80, 80, 3))
    img = nib.Nifti1Image(np.ones((80, 80, 3), np.float32), aff)
    slices, grid = to_axial_slices(img)
    assert np.all(slices == 1.0)  # crop fully inside the FOV
    assert fov_mask(grid).all()
    back = slices_to_native(slices, grid, img)
    assert back[40, 40, 1] == 1.0
    assert back[0, 0, 0] == 0.0 and back[79, 79, 2] == 0.0
    assert back[40, :, 1].sum() == pytest.approx(50.0, abs=1.0)  # 50 mm of 1 mm voxels kept


def test_padding_outside_fov_uses_fill_and_is_reported():
    img = phantom((64, 64, 5), LAS)
    slices, grid = to_axial_slices(img, fill=-7.0)
    valid = fov_mask(grid)
    # 64 x 0.5 mm = 32 mm = 128 fine pixels of 200 on each side
    assert valid[0].sum(axis=0).max() == 128
    assert np.all(slices[~valid] == -7.0)
    assert grid["valid_fraction"][0] == pytest.approx((128 / 200) ** 2)


def test_grid_mismatch_and_bad_input_raise():
    img = phantom((64, 64, 5), LAS)
    slices, grid = to_axial_slices(img)
    with pytest.raises(InputError):
        slices_to_native(slices[:3], grid, img)
    with pytest.raises(InputError):
        slices_to_native(slices, grid, phantom((64, 64, 5), RAS))
    with pytest.raises(InputError):
        through_plane_axis(np.diag([1.0, 1.0, 0.0, 1.0]))  # singular
    with pytest.raises(InputError):
        resample_like(np.zeros((4, 4, 4)), np.eye(4), (4, 4, 4), np.full((4, 4), np.nan))
    with pytest.raises(InputError):
        to_axial_slices(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)))


# ----------------------------------------------------------------------------- generic helpers


def test_resample_like_identity_flip_and_labels():
    rng = np.random.default_rng(0)
    data = rng.random((12, 10, 8)).astype(np.float32)
    aff = _affine(np.diag([1.0, 1.0, 1.0]), data.shape)
    same = resample_like(data, aff, data.shape, aff, order=1)
    np.testing.assert_allclose(same, data, atol=1e-6)
    # target = same voxels stored flipped along x
    flip = aff.copy()
    flip[:3, 0] *= -1
    flip[:3, 3] = aff[:3, :3] @ np.array([11, 0, 0]) + aff[:3, 3]
    np.testing.assert_allclose(resample_like(data, aff, data.shape, flip, order=3), data[::-1],
                               atol=1e-5)
    labels = rng.integers(0, 5, data.shape).astype(np.int16)
    out = resample_like(labels, aff, data.shape, flip, order=0)
    assert out.dtype == np.int16 and np.array_equal(out, labels[::-1])
    # 4D: channels resampled independently
    stack = np.stack([data, 2 * data], -1)
    np.testing.assert_allclose(resample_like(stack, aff, data.shape, flip, order=1)[..., 1],
                               2 * data[::-1], atol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_metrics_by_hand():
    a = np.zeros((4, 4, 2), bool)
    b = np.zeros((4, 4, 2), bool)
    assert dice(a, b) == 1.0  # both empty
    a[0, 0, 0] = True
    assert dice(a, b) == 0.0
    b[0, 0, 0] = b[1, 0, 0] = True
    assert dice(a, b) == pytest.approx(2 / 3)
    aff = np.diag([-0.5, 0.5, 3.0, 1.0])
    assert volume_mm3(b, aff) == pytest.approx(2 * 0.75)
    np.testing.assert_allclose(area_per_slice(b, aff, 2), [0.5, 0.0])
    np.testing.assert_allclose(area_per_slice(b, aff, 0), [1.5, 1.5, 0.0, 0.0])
    # probabilities are summed (soft area); oblique in-plane area = |cross product|
    sheared = np.array([[1.0, 1.0, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    assert inplane_area_mm2(sheared, 2) == pytest.approx(1.0)
    assert inplane_area_mm2(sheared, 1) == pytest.approx(2.0)
    assert area_per_slice(np.full((2, 2, 1), 0.5), sheared, 2)[0] == pytest.approx(2.0)
