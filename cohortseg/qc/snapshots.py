"""QC snapshots: deterministic, small, orientation-labelled PNG mosaics (matplotlib Agg, no pyplot).

Every volume is first reoriented to RAS+ (nibabel orientation utilities, no resampling), so what
is shown does not depend on the storage order of the file:

* axial    (slices along S-I): anterior at the top,
* coronal  (slices along A-P): superior at the top,
* sagittal (slices along L-R): superior at the top, anterior on the viewer's left,

and left/right follow the neurological convention (patient's left on the viewer's left) unless
``radiological=True``.  The sides are always written on the first panel (``L``/``R``, ``A``/``P``,
``S``/``I``) and in the figure title, so a reader never has to guess the convention.

Images may be given as arrays (+ ``affine``), nibabel images or paths.  Masks/label maps must be on
the image grid.  All writers go through :func:`cohortseg.io.atomic_path`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from PIL import Image
from scipy import ndimage

from cohortseg.io import atomic_path

__all__ = [
    "Snapshot",
    "mosaic",
    "lesion_crops",
    "registration_check",
    "thumbnail",
    "to_ras",
    "MASK_COLOR",
    "EDGE_COLOR",
    "LABEL_COLORS",
]

# Overlay colours are saturated and never grey, so an overlay pixel can be told from the
# (grey-scale) anatomy in tests and by eye.  Text is white/grey on purpose (same reason).
MASK_COLOR = (1.0, 0.18, 0.18)
EDGE_COLOR = (1.0, 0.18, 0.18)
OTHER_COLOR = (0.1, 0.85, 1.0)
LABEL_COLORS = [
    (1.0, 0.18, 0.18), (0.15, 0.9, 0.2), (0.2, 0.55, 1.0), (1.0, 0.85, 0.0), (1.0, 0.2, 1.0),
    (0.0, 0.95, 0.95), (1.0, 0.55, 0.0), (0.6, 0.35, 1.0), (0.55, 1.0, 0.55), (1.0, 0.5, 0.6),
]
_BG = "black"
_DPI = 100
_GREY_LEVELS = 128  # 7-bit greys: invisible on screen, ~20% smaller PNGs on noisy MRI
_VIEWS = {"axial": 2, "coronal": 1, "sagittal": 0}


@dataclass
class Snapshot:
    """What was drawn: for the record, the page and tests."""

    path: Path
    view: str
    slices: list = field(default_factory=list)  # slice indices in the RAS-reoriented volume
    sides: dict = field(default_factory=dict)    # {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    size: tuple = (0, 0)                         # PNG (width, height) in pixels
    note: str = ""


# --------------------------------------------------------------------------------------- geometry
def _load(x, affine=None):
    """-> (array, affine). Accepts ndarray (+affine, identity if None), nibabel image or path."""
    if isinstance(x, (str, Path)):
        import nibabel as nib

        x = nib.load(str(x))
    if hasattr(x, "affine") and hasattr(x, "dataobj"):
        return np.asanyarray(x.dataobj), np.asarray(x.affine if affine is None else affine, float)
    arr = np.asarray(x)
    return arr, (np.eye(4) if affine is None else np.asarray(affine, float))


def _as3d(arr, what):
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4:  # e.g. multi-echo: show the first volume
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{what}: expected a 3D volume, got shape {arr.shape}")
    return arr


def to_ras(arr, affine):
    """Reorient (no resampling) a 3D array to the closest RAS+ voxel order.

    Returns ``(array, affine, zooms)``; ``zooms`` are the voxel sizes along the new axes in mm.
    """
    arr = _as3d(arr, "volume")
    affine = np.asarray(affine, float)
    ornt = io_orientation(affine)
    out = apply_orientation(arr, ornt)
    new_aff = affine @ inv_ornt_aff(ornt, arr.shape)
    zooms = np.sqrt((new_aff[:3, :3] ** 2).sum(axis=0))
    zooms = np.where(zooms > 0, zooms, 1.0)
    return np.ascontiguousarray(out), new_aff, zooms


def _image_and_mask(image, mask, affine):
    """Load image (+ mask on the same grid), reorient both to RAS.

    -> (image float32, RAS affine, zooms, mask int32 (zeros if mask is None)).
    """
    raw, aff = _load(image, affine)
    raw = _as3d(raw, "image")
    img, aff_r, zooms = to_ras(raw.astype(np.float32, copy=False), aff)
    if mask is None:
        return img, aff_r, zooms, np.zeros(img.shape, np.int32)
    if isinstance(mask, np.ndarray):
        m, maff = mask, aff
    else:
        m, maff = _load(mask, None)
    m = _as3d(m, "mask")
    if m.shape != raw.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {raw.shape}")
    if not np.allclose(maff, aff, atol=1e-3):
        raise ValueError("mask affine differs from image affine: resample the mask first")
    m = np.nan_to_num(np.asarray(m, np.float32)).round().astype(np.int32)
    lab, _, _ = to_ras(m, aff)
    return img, aff_r, zooms, lab


def _sides(view, radiological):
    lr = ("R", "L") if radiological else ("L", "R")
    if view == "axial":
        return {"left": lr[0], "right": lr[1], "top": "A", "bottom": "P"}
    if view == "coronal":
        return {"left": lr[0], "right": lr[1], "top": "S", "bottom": "I"}
    return {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def _panel(vol, view, idx, radiological):
    """2D display array (rows top->bottom, cols left->right) of slice `idx` of a RAS volume."""
    ax = _VIEWS[view]
    sl = np.take(vol, idx, axis=ax)  # the two remaining axes, in RAS order
    d = sl.T[::-1]                   # rows: second axis descending (A or S at the top)
    if view == "sagittal":
        d = d[:, ::-1]               # anterior on the viewer's left
    elif radiological:
        d = d[:, ::-1]               # patient's right on the viewer's left
    return d


def _inplane(view):
    """(row axis, col axis) of the RAS volume for a view."""
    return {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}[view]


def _bbox(mask):
    """Inclusive-exclusive bounding box [(lo, hi), ...] of a non-empty boolean array."""
    from cohortseg.science.metrics import bounding_box

    return list(zip(*bounding_box(mask)))


def _expand(lo, hi, n, extra_lo, extra_hi):
    return max(0, lo - extra_lo), min(n, hi + extra_hi)


def _square_crop(box, zooms, shape, view, margin_mm, min_mm):
    """Crop the in-plane axes of `box` with a margin, squared up in mm, clipped to the volume."""
    out = list(box)
    r_ax, c_ax = _inplane(view)
    sizes = {}
    for ax in (r_ax, c_ax):
        lo, hi = box[ax]
        sizes[ax] = max((hi - lo) * zooms[ax] + 2 * margin_mm, min_mm)
    target = max(sizes.values())
    for ax in (r_ax, c_ax):
        lo, hi = box[ax]
        want = int(math.ceil(target / zooms[ax]))
        extra = max(0, want - (hi - lo))
        lo2, hi2 = _expand(lo, hi, shape[ax], extra // 2, extra - extra // 2)
        out[ax] = (lo2, hi2)
    return out


def _foreground(img):
    """Rough head/body foreground (for brain zoom and slice ranges): > 10% of the 99th pct."""
    finite = np.isfinite(img)
    step = max(1, round((img.size / 2e5) ** (1 / 3)))  # percentiles on a regular subsample
    sub = img[::step, ::step, ::step]
    vals = sub[np.isfinite(sub)]
    if vals.size == 0:
        return np.zeros(img.shape, bool)
    lo, hi = np.percentile(vals, [1, 99])
    fg = finite & (img > lo + 0.1 * (hi - lo))
    return fg if fg.any() else finite


def _window(values):
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _pick(indices, n):
    indices = np.asarray(sorted(set(int(i) for i in indices)))
    if indices.size <= n:
        return indices.tolist()
    pos = np.round(np.linspace(0, indices.size - 1, n)).astype(int)
    return indices[np.unique(pos)].tolist()


# ------------------------------------------------------------------------------------- rendering
def _figure(ncols, nrows, panel_w_in, panel_h_in, title_in=0.35):
    fig = Figure(figsize=(ncols * panel_w_in, nrows * panel_h_in + title_in), dpi=_DPI,
                 facecolor=_BG)
    FigureCanvasAgg(fig)
    return fig


def _grid(fig, ncols, nrows, title_in):
    h = fig.get_figheight()
    top = 1.0 - title_in / h
    axes = []
    for i in range(nrows * ncols):
        r, c = divmod(i, ncols)
        gx = 0.03 / fig.get_figwidth()   # ~3 px gap between tiles
        gy = 0.03 / h
        ax = fig.add_axes([c / ncols + gx / 2, top - (r + 1) * top / nrows + gy / 2,
                           1 / ncols - gx, top / nrows - gy])
        ax.set_facecolor(_BG)
        ax.set_axis_off()
        axes.append(ax)
    return axes


def _side_labels(ax, sides, fontsize=9):
    kw = dict(transform=ax.transAxes, color="white", fontsize=fontsize, fontweight="bold",
              bbox=dict(boxstyle="square,pad=0.1", facecolor="black", edgecolor="none",
                        alpha=0.6))
    ax.text(0.02, 0.5, sides["left"], ha="left", va="center", **kw)
    ax.text(0.98, 0.5, sides["right"], ha="right", va="center", **kw)
    ax.text(0.5, 0.98, sides["top"], ha="center", va="top", **kw)
    ax.text(0.5, 0.02, sides["bottom"], ha="center", va="bottom", **kw)


def _corner(ax, text, fontsize=7):
    ax.text(0.02, 0.02, text, transform=ax.transAxes, color="0.9", fontsize=fontsize,
            ha="left", va="bottom",
            bbox=dict(boxstyle="square,pad=0.1", facecolor="black", edgecolor="none", alpha=0.6))


def _outline(ax, mask2d, color, lw=1.2):
    if not mask2d.any():
        return
    # Padding keeps contours closed at the crop border; antialiased=False gives exact colours.
    pad = np.pad(mask2d.astype(np.float32), 1)
    ys = np.arange(-1, mask2d.shape[0] + 1)
    xs = np.arange(-1, mask2d.shape[1] + 1)
    ax.contour(xs, ys, pad, levels=[0.5], colors=[color], linewidths=lw, antialiased=False)


def _fill(ax, mask2d, color, alpha=0.4):
    rgba = np.zeros(mask2d.shape + (4,), np.float32)
    rgba[mask2d] = (*color, alpha)
    ax.imshow(rgba, interpolation="nearest", aspect=ax.get_aspect())


def _save(fig, out_png, quantize=True) -> tuple:
    """Render to RGB and write an optimised PNG atomically (deterministic bytes)."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    im = Image.fromarray(rgb, "RGB")
    if quantize:
        im = _to_palette(rgb) or im
    with atomic_path(out_png, suffix=".png") as tmp:
        im.save(tmp, format="PNG", optimize=True)
    return im.size


def _to_palette(rgb, max_grey=_GREY_LEVELS):
    """Palette conversion: greys keep `max_grey` levels, overlay colours stay exact.

    The anatomy is grey (R=G=B) and overlays use a handful of exact colours (antialiasing off), so
    a 256-entry palette fits; this cuts the PNG size ~3x.  Returns None if that does not hold.
    """
    flat = rgb.reshape(-1, 3)
    grey = (flat[:, 0] == flat[:, 1]) & (flat[:, 1] == flat[:, 2])
    colours = np.unique(flat[~grey], axis=0) if (~grey).any() else np.zeros((0, 3), np.uint8)
    n_grey = min(max_grey, 256 - len(colours))
    if len(colours) > 32:
        return None
    levels = np.round(np.linspace(0, 255, n_grey)).astype(np.uint8)
    idx = np.zeros(flat.shape[0], np.uint8)
    g = flat[grey, 0].astype(np.float32)
    idx[grey] = np.round(g * (n_grey - 1) / 255.0).astype(np.uint8)
    if len(colours):
        key = (flat[~grey].astype(np.int64) * np.array([65536, 256, 1])).sum(1)
        ckey = (colours.astype(np.int64) * np.array([65536, 256, 1])).sum(1)
        idx[~grey] = (n_grey + np.searchsorted(ckey, key)).astype(np.uint8)
    palette = np.concatenate([np.repeat(levels[:, None], 3, 1), colours]).astype(np.uint8)
    im = Image.fromarray(idx.reshape(rgb.shape[:2]), "P")
    im.putpalette(palette.ravel().tolist())
    return im


def _layout(n, panel_aspect, target=4 / 3):
    """Columns for n panels (panel_aspect = height/width) so the mosaic is about `target` wide."""
    best, best_err = 1, float("inf")
    for c in range(1, n + 1):
        r = math.ceil(n / c)
        ratio = c / (r * panel_aspect)
        err = abs(math.log(ratio / target)) + 0.05 * (r * c - n)
        if err < best_err:
            best, best_err = c, err
    return best, math.ceil(n / best)


def _is_labels(m):
    if m.dtype.kind in "iu" and m.size and m.min() >= 0 and m.max() < 65536:
        vals = np.flatnonzero(np.bincount(m.ravel()))  # much faster than unique on 10M voxels
    else:
        vals = np.unique(m[np.isfinite(m)] if m.dtype.kind == "f" else m)
    vals = vals[vals != 0]
    return vals, (len(vals) > 1 or (len(vals) == 1 and vals[0] != 1))


# ------------------------------------------------------------------------------------ public API
def mosaic(image, mask_or_labels, affine=None, out_png="mosaic.png", view="axial", zoom="cord",
           n=12, contour=True, title=None, *, radiological=False, margin_mm=None,
           panel_px=220, max_px=1000) -> Snapshot:
    """Mosaic of up to `n` slices of `image` that contain the mask, with mask contours.

    mask_or_labels: binary mask (contour in MASK_COLOR) or integer label map (one colour per
        label from LABEL_COLORS, in sorted label order); ``None`` for the image alone.  Values
        are rounded to integers, so a probability map is shown thresholded at 0.5.
    view: "axial" | "sagittal" | "coronal" (after RAS reorientation).
    zoom: "cord" = crop around the mask bounding box (margin, default 12 mm, min 30 mm FOV);
        "brain" = crop around the head/brain foreground; None = the whole slice.
    contour: outlines (True) or semi-transparent fill (False).
    Empty mask: slices evenly spread over the image foreground, noted in the title.
    Returns a :class:`Snapshot`.
    """
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {sorted(_VIEWS)}, got {view!r}")
    if zoom not in ("cord", "brain", None):
        raise ValueError(f"zoom must be 'cord', 'brain' or None, got {zoom!r}")
    img, aff_r, zooms, lab = _image_and_mask(image, mask_or_labels, affine)
    values, multi = _is_labels(lab)
    present = lab != 0
    ax_s = _VIEWS[view]
    note = ""
    fg = _foreground(img)
    if present.any():
        box = _bbox(present)
        other = tuple(a for a in range(3) if a != ax_s)
        slices = _pick(np.flatnonzero(present.any(axis=other)), n)
    else:
        note = "empty mask"
        box = _bbox(fg) if fg.any() else [(0, s) for s in img.shape]
        lo, hi = box[ax_s]
        slices = _pick(np.round(np.linspace(lo, hi - 1, n + 2)[1:-1]).astype(int), n)
    if zoom == "cord" and present.any():
        crop = _square_crop(box, zooms, img.shape, view, 12.0 if margin_mm is None else margin_mm,
                            30.0)
    elif zoom in ("brain", "cord") and fg.any():
        fbox = _bbox(fg)
        crop = _square_crop(fbox, zooms, img.shape, view, 5.0 if margin_mm is None else margin_mm,
                            0.0)
    else:
        crop = [(0, s) for s in img.shape]
    crop[ax_s] = (0, img.shape[ax_s])
    sub = tuple(slice(a, b) for a, b in crop)
    img_c, lab_c = img[sub], lab[sub]
    vmin, vmax = _window(np.take(img_c, slices, axis=ax_s))
    sides = _sides(view, radiological)
    r_ax, c_ax = _inplane(view)
    aspect = zooms[r_ax] / zooms[c_ax]
    h_mm = img_c.shape[r_ax] * zooms[r_ax]
    w_mm = img_c.shape[c_ax] * zooms[c_ax]
    panel_aspect = h_mm / w_mm
    ncols, nrows = _layout(len(slices), panel_aspect)
    pw = min(panel_px, max_px / ncols) / _DPI
    ph = pw * panel_aspect
    title_in = 0.32
    fig = _figure(ncols, nrows, pw, ph, title_in)
    axes = _grid(fig, ncols, nrows, title_in)
    coord_name = {"axial": "z", "coronal": "y", "sagittal": "x"}[view]
    for i, ax in enumerate(axes):
        if i >= len(slices):
            continue
        k = slices[i]
        ax.imshow(_panel(img_c, view, k, radiological), cmap="gray", vmin=vmin, vmax=vmax,
                  interpolation="nearest", aspect=aspect, resample=False)
        lab2 = _panel(lab_c, view, k, radiological)
        if multi:
            for j, v in enumerate(values):
                col = LABEL_COLORS[j % len(LABEL_COLORS)]
                (_outline(ax, lab2 == v, col) if contour else _fill(ax, lab2 == v, col))
        elif present.any():
            (_outline(ax, lab2 != 0, MASK_COLOR) if contour else _fill(ax, lab2 != 0, MASK_COLOR))
        ax.set_xlim(-0.5, lab2.shape[1] - 0.5)
        ax.set_ylim(lab2.shape[0] - 0.5, -0.5)
        vox = [(a + b) / 2 for a, b in crop]
        vox[ax_s] = k
        pos = float((aff_r @ np.r_[vox, 1.0])[ax_s])
        _corner(ax, f"{coord_name}={pos:.1f}mm [{k}]")
        if i == 0:
            _side_labels(ax, sides)
    conv = ("radiological" if radiological else "neurological") if view != "sagittal" else "A left"
    head = title or ""
    tail = f"{view} ({conv}: {sides['left']} | {sides['right']})" + (f" - {note}" if note else "")
    fig.text(0.5, 1 - (title_in / 2) / fig.get_figheight(), f"{head}  {tail}".strip(),
             ha="center", va="center", color="white", fontsize=9)
    if multi:
        handles = [Line2D([], [], color=LABEL_COLORS[j % len(LABEL_COLORS)], lw=2, label=str(v))
                   for j, v in enumerate(values[:10])]
        leg = fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=6,
                         frameon=False, labelcolor="white", handlelength=1.0,
                         bbox_to_anchor=(1.0, 1.0))
        leg.set_zorder(10)
    size = _save(fig, out_png)
    return Snapshot(Path(out_png), view, list(slices), sides, size, note)


def lesion_crops(image, labels, affine=None, out_png="lesions.png", max_lesions=24, size_mm=24.0,
                 *, title=None, radiological=False, min_voxels=1, panel_px=140) -> Snapshot:
    """Grid of axial crops (`size_mm` square) centred on each lesion, largest first.

    Lesions are the 26-connected components of ``labels > 0`` with at least `min_voxels` voxels;
    each crop is the axial slice through the lesion where it is largest, the lesion outlined in
    MASK_COLOR and other lesions in the crop in cyan.  No lesion: a single "no lesions" panel.
    """
    img, aff_r, zooms, lab = _image_and_mask(image, labels, affine)
    lab = lab > 0
    comp, n_comp = ndimage.label(lab, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comp.ravel(), minlength=n_comp + 1)[1:]
    ids = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels]
    total = len(ids)
    ids = ids[:max_lesions]
    vox_mm3 = float(np.prod(zooms))
    sides = _sides("axial", radiological)
    objs = ndimage.find_objects(comp)
    nshow = max(1, len(ids))
    ncols, nrows = _layout(nshow, 1.0)
    ncols = max(ncols, 3)  # room for the title even with one lesion
    pw = panel_px / _DPI
    title_in = 0.32
    fig = _figure(ncols, nrows, pw, pw, title_in)
    axes = _grid(fig, ncols, nrows, title_in)
    half = [max(1, int(round(size_mm / 2 / z))) for z in zooms[:2]]
    for i, ax in enumerate(axes):
        if i >= len(ids):
            if i == 0:
                ax.text(0.5, 0.5, "no lesions", color="white", ha="center", va="center",
                        transform=ax.transAxes, fontsize=10)
            continue
        lid = ids[i]
        sl = objs[lid - 1]
        sub = comp[sl] == lid
        counts = sub.sum(axis=(0, 1))
        k = sl[2].start + int(np.argmax(counts))
        cx, cy = [int(round(c)) for c in ndimage.center_of_mass(comp[:, :, k] == lid)]
        xs = slice(cx - half[0], cx + half[0] + 1)
        ys = slice(cy - half[1], cy + half[1] + 1)
        tile_img = _padded(img[:, :, k], xs, ys, np.nan)
        tile_lab = _padded(comp[:, :, k], xs, ys, 0)
        d_img = _panel(tile_img[:, :, None], "axial", 0, radiological)
        d_this = _panel((tile_lab == lid)[:, :, None], "axial", 0, radiological)
        d_other = _panel(((tile_lab != 0) & (tile_lab != lid))[:, :, None], "axial", 0,
                         radiological)
        vmin, vmax = _window(tile_img)
        ax.imshow(np.nan_to_num(d_img, nan=vmin), cmap="gray", vmin=vmin, vmax=vmax,
                  interpolation="nearest", aspect=zooms[1] / zooms[0], resample=False)
        _outline(ax, d_other, OTHER_COLOR, lw=1.0)
        _outline(ax, d_this, MASK_COLOR, lw=1.0)
        ax.set_xlim(-0.5, d_img.shape[1] - 0.5)
        ax.set_ylim(d_img.shape[0] - 0.5, -0.5)
        _corner(ax, f"#{i + 1} {sizes[lid - 1] * vox_mm3:.1f}mm3 [{cx},{cy},{k}]", fontsize=6)
        if i == 0:
            _side_labels(ax, sides, fontsize=7)
    shown = (f"{len(ids)} largest of {total} lesions" if total > len(ids)
             else f"{total} lesion{'' if total == 1 else 's'}")
    head = (title + "  ") if title else ""
    fig.text(0.5, 1 - (title_in / 2) / fig.get_figheight(),
             f"{head}{shown}, axial {size_mm:g} mm ({sides['left']} | {sides['right']})",
             ha="center", va="center", color="white", fontsize=8)
    size = _save(fig, out_png)
    return Snapshot(Path(out_png), "axial", [], sides, size, "" if total else "no lesions")


def _padded(a2, xs, ys, fill):
    """a2[xs, ys] with out-of-range parts filled (crops near the border stay centred)."""
    nx, ny = a2.shape
    out = np.full((xs.stop - xs.start, ys.stop - ys.start), fill,
                  dtype=np.float32 if isinstance(fill, float) else a2.dtype)
    x0, x1 = max(xs.start, 0), min(xs.stop, nx)
    y0, y1 = max(ys.start, 0), min(ys.stop, ny)
    if x1 > x0 and y1 > y0:
        out[x0 - xs.start:x1 - xs.start, y0 - ys.start:y1 - ys.start] = a2[x0:x1, y0:y1]
    return out


def registration_check(moving_resampled, fixed, out_png, affine=None, *, n=4, title=None,
                       radiological=False, panel_px=200) -> Snapshot:
    """Edges of `fixed` (Canny) drawn over `moving_resampled` (already on the fixed grid).

    Rows: axial, coronal, sagittal; `n` slices each, spread over the fixed image's foreground.
    """
    from skimage.feature import canny

    mov, _ = _load(moving_resampled, affine)
    fix, faff = _load(fixed, affine)
    mov, fix = _as3d(mov, "moving"), _as3d(fix, "fixed")
    if mov.shape != fix.shape:
        raise ValueError(f"moving {mov.shape} is not on the fixed grid {fix.shape}: resample first")
    mov, aff_r, zooms = to_ras(mov.astype(np.float32, copy=False), faff)
    fix, _, _ = to_ras(fix.astype(np.float32, copy=False), faff)
    fg = _foreground(fix)
    box = _bbox(fg) if fg.any() else [(0, s) for s in fix.shape]
    sub = tuple(slice(max(0, a - 2), min(s, b + 2)) for (a, b), s in zip(box, fix.shape))
    mov, fix = mov[sub], fix[sub]
    mv = _window(mov)
    fv = _window(fix)
    views = ["axial", "coronal", "sagittal"]
    dims = []
    for v in views:
        r_ax, c_ax = _inplane(v)
        dims.append((fix.shape[r_ax] * zooms[r_ax], fix.shape[c_ax] * zooms[c_ax]))
    panel_aspect = max(h / w for h, w in dims)
    pw = panel_px / _DPI
    title_in = 0.32
    fig = _figure(n, 3, pw, pw * panel_aspect, title_in)
    axes = _grid(fig, n, 3, title_in)
    for r, v in enumerate(views):
        ax_s = _VIEWS[v]
        r_ax, c_ax = _inplane(v)
        ks = np.round(np.linspace(0, fix.shape[ax_s] - 1, n + 2)[1:-1]).astype(int)
        sides = _sides(v, radiological)
        for c, k in enumerate(ks):
            ax = axes[r * n + c]
            m2 = _panel(mov, v, k, radiological)
            f2 = _panel(fix, v, k, radiological)
            ax.imshow(m2, cmap="gray", vmin=mv[0], vmax=mv[1], interpolation="nearest",
                      aspect=zooms[r_ax] / zooms[c_ax], resample=False)
            fn = np.clip((f2 - fv[0]) / (fv[1] - fv[0]), 0, 1)
            edges = canny(fn, sigma=1.0) if min(fn.shape) >= 3 else np.zeros(fn.shape, bool)
            rgba = np.zeros(edges.shape + (4,), np.float32)
            rgba[edges] = (*EDGE_COLOR, 1.0)
            ax.imshow(rgba, interpolation="nearest", aspect=zooms[r_ax] / zooms[c_ax],
                      resample=False)
            if c == 0:
                _side_labels(ax, sides, fontsize=7)
            _corner(ax, f"{v} [{k + sub[ax_s].start}]", fontsize=6)
    head = (title + "  ") if title else ""
    fig.text(0.5, 1 - (title_in / 2) / fig.get_figheight(),
             f"{head}edges of fixed (red) on moving", ha="center", va="center", color="white",
             fontsize=9)
    size = _save(fig, out_png)
    return Snapshot(Path(out_png), "all", [], _sides("axial", radiological), size)


def thumbnail(png, out_png, width=160) -> Path:
    """Downscale a PNG to `width` pixels (aspect kept, never upscaled) for the QC page."""
    with Image.open(png) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w > width:
            im = im.resize((width, max(1, round(h * width / w))), Image.Resampling.LANCZOS)
        with atomic_path(out_png, suffix=".png") as tmp:
            im.save(tmp, format="PNG", optimize=True)
    return Path(out_png)
