"""Make ``.devdata/``: the data a GPU machine needs for ``device_run.sh``, small enough to send.

A lent GPU machine receives the repository only (64 MiB at most), not ``../shared/data``. This
copies ``webnews/`` without the captions (the pixel run does not read them) and with every
photo shrunk to 80 px on its short side (Lanczos, JPEG quality 92): about 28 MB. The pixel
run decodes them at 64 px as usual; against decoding the originals at 64 px the mean absolute
pixel difference is about 0.018 (on [0, 1]). ``.devdata/`` is git-ignored; carry it.

Run: ``python benchmarks/make_devdata.py`` (then ``run`` with ``carry=[".devdata"]``);
``--short-side 224`` for the EfficientNet-Lite0 fine-tuning run (224 px crops): 56 MiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("CMDA_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(ROOT / ".devdata"))
    parser.add_argument("--short-side", type=int, default=80)
    args = parser.parse_args()
    from PIL import Image

    src, dst = Path(args.data) / "webnews", Path(args.out) / "webnews"
    if not (src / "derived_index.tsv").is_file():
        raise SystemExit(f"--data: expected the shared data folder holding webnews/, got {args.data}")
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)
    photos = [p for p in (src / "images").rglob("*") if p.is_file()]
    for photo in photos:
        out = dst / photo.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as img:
            img = img.convert("RGB")
            width, height = img.size
            scale = args.short_side / min(width, height)
            if scale < 1:
                img = img.resize((max(args.short_side, round(width * scale)), max(args.short_side, round(height * scale))),
                                 Image.LANCZOS)
            img.save(out, quality=92)
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(f"wrote {len(photos)} photos and the index to {dst} ({size / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    main()
