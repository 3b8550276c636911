"""Sphinx configuration of the pyro_nf documentation (MyST markdown pages, furo theme).

Build with ``make docs``; warnings are errors. Nothing here needs the network:
intersphinx is off, the API reference is built from the docstrings, and MathJax
is served from the built site (``sphinx-mathjax-offline``, in the ``docs`` extra,
copies it into ``_static/mathjax``), so the math renders offline too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyro_nf  # noqa: E402

project = "pyro_nf"
author = "the pyro_nf authors"
copyright = "the pyro_nf authors, Apache-2.0"
release = pyro_nf.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    # MathJax 3 from the package instead of a CDN: sets mathjax_path to _static/mathjax/tex-chtml.js.
    "sphinx-mathjax-offline",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ / $$...$$ math, ::: fences, and anchors for ## and ### headings.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: members in source order, type hints in the description rather than
# in (long) signatures. Docstrings are Google style (Args:, Returns:).
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
# torch and Pyro docstrings (nn.Module.forward, Transform.sign) describe their
# base classes, not these methods: do not copy them onto our overrides.
autodoc_inherit_docstrings = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"pyro_nf {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"
pygments_dark_style = "monokai"


# Members are listed in source order, or in the order of the module's ``__all__`` where it has
# one: every module of pyro_nf.transforms and pyro_nf.infer lists its factories (maf, realnvp,
# glow, ...) first there, then the classes they build (tests/test_api_docs.py keeps it so).
