"""antspyx registration helpers (world-space matrices). The deep-T1-WMH MNI box is tested in test_deepwmh.py."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from cohortseg.science import registration as R

from standins import crude_brain_mask


@pytest.fixture(scope="module")
def mni2():
    return R.mni_template(2)


def _shift_content(data: np.ndarray, shift) -> np.ndarray:
    out = np.zeros_like(data)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, data.shape))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, data.shape))
    out[dst] = data[src]
    return out


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_mni_template_ships_offline(mni2):
    t, m = mni2
    assert t.shape == (99, 117, 95) and m.shape == t.shape
    np.testing.assert_allclose(t.affine[:3, 3], [-98, -134, -72])
    assert 200_000 < np.asarray(m.dataobj).sum() < 260_000


def test_rigid_recovers_a_known_translation_deterministically(mni2):
    t, _ = mni2
    shift_vox = (3, -2, 4)  # content moves by +6, -4, +8 mm (2 mm voxels, RAS axes)
    moving = nib.Nifti1Image(_shift_content(np.asarray(t.dataobj), shift_vox), t.affine)
    tr = R.rigid(moving, t)
    expected = -2.0 * np.array(shift_vox)  # moving -> fixed undoes the shift
    assert np.abs(tr.translation - expected).max() < 1.0
    np.testing.assert_allclose(tr.matrix[:3, :3], np.eye(3), atol=0.02)
    again = R.rigid(moving, t)
    np.testing.assert_array_equal(again.matrix, tr.matrix)  # single ITK thread + fixed seed
    # the moved content lands back on the template
    back = np.asarray(R.apply(tr, moving, t).dataobj)
    inner = np.zeros(t.shape, bool)
    inner[10:-10, 10:-10, 10:-10] = True
    assert np.corrcoef(back[inner], np.asarray(t.dataobj)[inner])[0, 1] > 0.99
    # serialisable for a job's meta
    tr2 = R.LinearTransform.from_dict(tr.to_dict())
    np.testing.assert_array_equal(tr2.matrix, tr.matrix)
    assert tr2.fixed_shape == t.shape


def test_apply_and_points_agree_with_ants(mni2, tmp_path):
    ants = R._ants()
    t, _ = mni2
    lia = t.as_reoriented(nib.orientations.axcodes2ornt("LIA"))  # exercise orientation handling
    c, s = np.cos(0.2), np.sin(0.2)
    m = np.array([[c, -s, 0, 5.0], [s, c, 0, -7.0], [0, 0, 1.1, 3.0], [0, 0, 0, 1]])
    tr = R.LinearTransform(m, fixed_shape=t.shape, fixed_affine=t.affine)
    ours = np.asarray(R.apply(tr, lia, t, "linear").dataobj)
    mat = tr.write_ants(tmp_path / "tx.mat")
    theirs = ants.apply_transforms(R.to_ants(t), R.to_ants(lia), [mat], interpolator="linear").numpy()
    scale = float(np.asarray(t.dataobj).max())
    assert np.abs(ours - theirs).max() < 0.02 * scale
    assert np.abs(ours - theirs).mean() < 0.001 * scale
    # points: ours maps moving -> fixed; ANTs' point mapping with the same file maps fixed -> moving
    import pandas as pd

    p_mov = np.array([[10.0, -20.0, 30.0], [-40.0, 5.0, 0.0]])
    p_fix = nib.affines.apply_affine(tr.matrix, p_mov)
    lps = p_fix * [-1, -1, 1]
    out = ants.apply_transforms_to_points(3, pd.DataFrame(lps, columns=["x", "y", "z"]), [mat])
    np.testing.assert_allclose(out[["x", "y", "z"]].to_numpy() * [-1, -1, 1], p_mov, atol=1e-3)
    np.testing.assert_allclose(nib.affines.apply_affine(tr.inverse().matrix, p_fix), p_mov, atol=1e-9)
    # nearest keeps labels; inverse=True pulls a fixed-space image back
    lab = R.apply(tr, nib.Nifti1Image((np.asarray(lia.dataobj) > 0.5).astype(np.uint8), lia.affine), t, "nearest")
    assert np.asarray(lab.dataobj).dtype == np.uint8 and set(np.unique(lab.dataobj)) <= {0, 1}
    back = R.apply(tr, R.apply(tr, t, t), (t.shape, t.affine), inverse=True)
    assert back.shape == t.shape
    with pytest.raises(ValueError):
        R.apply(tr, t, t, "sinc")


def test_ants_image_round_trip_keeps_the_affine():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    aff = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -20], [0, -1.0, 0, 30], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, aff)
    back = R.from_ants(R.to_ants(img))
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


# ----------------------------------------------------------------------------------------------
# real T1 -> MNI and the deep-T1-WMH box
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_t1(shared_dir):
    img = nib.load(shared_dir / "data" / "brain" / "t1_crop.nii.gz")
    mask = crude_brain_mask(np.asarray(img.dataobj, np.float32))
    mimg = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    tr = R.affine_to_mni(img, brain_mask=mimg)
    return img, mimg, tr


@pytest.mark.shared
def test_affine_to_mni_on_a_real_t1(real_t1, mni2):
    img, mimg, tr = real_t1
    _, mni_mask = mni2
    warped = R.apply(tr, mimg, mni_mask, "nearest")
    ident = R.apply(R.LinearTransform(np.eye(4)), mimg, mni_mask, "nearest")
    d, d0 = _dice(warped.dataobj, mni_mask.dataobj), _dice(ident.dataobj, mni_mask.dataobj)
    assert d > 0.85 and d > d0 + 0.05
    assert 0.7 < abs(np.linalg.det(tr.matrix[:3, :3])) < 1.6
    # MNI point mapping for the census
    centre = np.argwhere(np.asarray(mimg.dataobj) > 0).mean(axis=0)
    world = nib.affines.apply_affine(img.affine, centre)
    mni = nib.affines.apply_affine(tr.matrix, world)
    assert np.linalg.norm(mni - [0, -18, 10]) < 25  # the brain's centre lands near MNI's centre
