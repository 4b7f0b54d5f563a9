"""Remake the README's demo pictures from a finished demo run (demo/results):

    python docs/img/screenshot.py [demo/results]

docs/img/demo_qc_page.png: qc/index.html in headless Debian chromium (playwright, no browser
download); docs/img/demo_qc_brain.png: sub-01's brain-tissue QC mosaic. Both are palette-quantised
to stay small (< 300 kB).
"""
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def small_png(src, dst, width=None):
    img = Image.open(src).convert("RGB")
    if width and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    print(dst, Path(dst).stat().st_size // 1024, "kB")


def main(results="demo/results"):
    from playwright.sync_api import sync_playwright

    results = Path(results).resolve()
    shot = HERE / "_page.png"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto((results / "qc" / "index.html").as_uri())
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shot))
        b.close()
    small_png(shot, HERE / "demo_qc_page.png")
    shot.unlink()
    mosaic = sorted((results / "brain_tissue").rglob("*_qc.png"))[0]
    small_png(mosaic, HERE / "demo_qc_brain.png", width=1000)


if __name__ == "__main__":
    main(*sys.argv[1:])
