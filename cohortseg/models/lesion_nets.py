"""Running the SHIVA lesion path's networks on prepared arrays: a brainchop MeshNet brain mask, the
SHIVA fold ensemble on its crop. Arrays in, arrays out; which card is which net is
:mod:`cohortseg.models.lesion_cards`, the deep-T1-WMH nets run in :mod:`cohortseg.models.nets.deepwmh_torch`."""
from __future__ import annotations

import numpy as np

from cohortseg.models.ensemble import fold_average


def meshnet_brain_mask(folds: list, vol_ras: np.ndarray, spec) -> np.ndarray:
    """Brain mask from a brainchop MeshNet (mindgrab) on a conformed RAS volume: reoriented to LIA (the
    MeshNets' training orientation, pure re-indexing), FreeSurfer-like uint8 scaling (0 .. 99.9th
    percentile of the non-zero voxels), brainchop's min-max + crop recipe (:func:`cohortseg.science.brain.run_meshnet`),
    mean of the folds' brain probability > 0.5, largest component with holes filled."""
    import nibabel as nib

    from cohortseg.science.brain import largest_component, run_meshnet

    ras, lia = nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LIA")
    to_lia = nib.orientations.ornt_transform(ras, lia)
    back = nib.orientations.ornt_transform(lia, ras)
    v = np.asarray(vol_ras, np.float32)
    pos = v[v > 0]
    hi = float(np.percentile(pos, 99.9)) if pos.size else 1.0
    u8 = np.clip(np.rint(np.clip(v, 0, None) / max(hi, 1e-6) * 255.0), 0, 255).astype(np.uint8)
    u8 = nib.orientations.apply_orientation(u8, to_lia)
    acc = None
    for f in folds:
        model = getattr(f, "model", f)
        p = run_meshnet(model, u8, norm=spec.norm, padding=spec.crop_padding, threshold=spec.crop_threshold)[..., 1]
        acc = p if acc is None else acc + p
    m = largest_component(acc / len(folds) > 0.5)
    return np.ascontiguousarray(nib.orientations.apply_orientation(m, back)).astype(bool)


def shiva_probability(models: list, cards: list, seg: list[int], vol: np.ndarray, channels: list[str],
                      mask: np.ndarray, batch_size: int):
    """The SHIVA ensemble: crop 160x214x176 around `mask` (:func:`cohortseg.models.shiva.crop_box`), p99
    normalisation in the mask per channel, the mean over every fold of every segmentation card `seg`
    (each card gets the channels its modalities name). Returns (lesion probability on the crop,
    float16; the crop box)."""
    from cohortseg.models import shiva
    from cohortseg.models.lesion_cards import card_modalities

    box = shiva.crop_box(mask)
    mcrop = shiva.crop(mask, box)
    acc, n = None, 0
    for i in seg:
        idx = [channels.index(m) for m in card_modalities(cards[i])]
        xin = shiva.normalise_p99(shiva.crop(vol[..., idx], box), mcrop)[None]
        folds = models[i]
        p = fold_average([f.predict for f in folds], xin, batch_size).astype(np.float64)
        p = p[..., -1] if p.ndim == 5 else p  # (1, X, Y, Z): the lesion channel
        acc = p * len(folds) if acc is None else acc + p * len(folds)
        n += len(folds)
    return (acc / n)[0].astype(np.float16), box
