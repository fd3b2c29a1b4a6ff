"""The streamlit sampling and inpainting apps (`scripts/sample_app.py`, `scripts/inpaint_app.py`).

`ldm.apps.core` holds what the apps compute (loading, conditions, sampler option values, images, masks,
uploads, the reproducing command line) and imports no streamlit, so it is tested directly; `ldm.apps.ui`
draws the pages. Both read a prior only through its public interface (`sample`, `inpaint`, the sampler
`callback`, `sampler_options`), so a new prior appears in the apps without changes here.
"""
