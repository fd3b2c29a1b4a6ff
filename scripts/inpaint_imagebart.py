"""ImageBART's original entry name, kept: the inpainting app, which serves every prior (`scripts/inpaint_app.py`).

    streamlit run scripts/inpaint_imagebart.py -- <checkpoint or sampling config>
"""

from __future__ import annotations

import runpy
from pathlib import Path


def main() -> None:
    runpy.run_path(str(Path(__file__).with_name("inpaint_app.py")), run_name="__main__")


if __name__ == "__main__":
    main()
