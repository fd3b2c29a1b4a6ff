"""Sample any prior in the browser: sampler controls from the prior's declared options, live progress,
the grid, downloads and the `scripts/sample.py` command that reproduces it; a second checkpoint side by side.

    streamlit run scripts/sample_app.py -- logs/<prior run>/checkpoints/last.ckpt [more checkpoints, sampling configs]
    # a page address may set the start values: http://localhost:8501/?checkpoint=<path>&seed=3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from ldm.apps.core import app_sources
    from ldm.apps.ui import sample_page  # streamlit is imported only to draw the page

    sample_page(app_sources(sys.argv[1:]))


if __name__ == "__main__":
    main()
