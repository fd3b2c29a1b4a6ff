"""Inpaint with any prior in the browser: an uploaded image or one of the validation split, a mask drawn on
a canvas or a preset, its preview on the prior's latent grid, the prior's inpainting options, and downloads.

    streamlit run scripts/inpaint_app.py -- logs/<prior run>/checkpoints/last.ckpt [more checkpoints, sampling configs]
    # a page address may set the start values: http://localhost:8501/?checkpoint=<path>&seed=3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from ldm.apps.core import app_sources
    from ldm.apps.ui import inpaint_page  # streamlit is imported only to draw the page

    inpaint_page(app_sources(sys.argv[1:]))


if __name__ == "__main__":
    main()
