"""Every broken input gets a clear reason (file + why); repairable ones load with a warning."""
import pytest

from badinputs import CASES, REPAIRABLE, make_bad
from cohortseg.errors import InputError
from cohortseg.io import load_image

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def src(shared_dir):
    return shared_dir / "data/spine/t2s/t2s.nii.gz"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_has_clear_error(case, src, tmp_path):
    bad = make_bad(case, src, tmp_path / f"sub-x_{case}.nii.gz")
    with pytest.raises(InputError) as e:
        load_image(bad, max_voxels=50_000_000)
    assert CASES[case][1] in e.value.reason, e.value.reason
    assert e.value.path == str(bad)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_image(tmp_path / "nope.nii.gz")


def test_4d_allowed_takes_first_volume(src, tmp_path):
    bad = make_bad("four_d", src, tmp_path / "x.nii.gz")
    img, warnings = load_image(bad, allow_4d=True)
    assert img.shape == (49, 54, 9) and "first volume" in warnings[0]
    import nibabel as nib
    import numpy as np

    assert np.allclose(img.get_fdata(), nib.load(src).get_fdata())


@pytest.mark.parametrize("case", sorted(REPAIRABLE))
def test_repairable(case, src, tmp_path):
    img, warnings = load_image(make_bad(case, src, tmp_path / "x.nii.gz"))
    assert any(REPAIRABLE[case][1] in w for w in warnings)
    import numpy as np

    assert np.isfinite(img.get_fdata()).all()


def test_good_image_loads_clean(src):
    img, warnings = load_image(src)
    assert img.shape == (49, 54, 9) and warnings == []
