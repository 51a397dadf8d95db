"""Sphinx configuration for dml_bias."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import dml_bias

project = "dml_bias"
author = "The dml_bias developers"
copyright = "2026, The dml_bias developers"
version = release = dml_bias.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # serves MathJax from _static/mathjax: formulas render without a network
    "sphinx.ext.viewcode",
    "sphinxcontrib.bibtex",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_intersphinx"]
nitpicky = True
# Type-hint internals that have no documentation page of their own.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch\.)?_?[A-Za-z]*Tensor[A-Za-z]*Like"),
    (r"py:.*", r"Ellipsis|EllipsisType"),
    (r"py:.*", r"(numpy\.)?typing\..*|npt\..*"),
    (r"py:.*", r"(dml_bias\.transforms\._conv\.)?ModuleT"),  # adapt_input_conv's TypeVar: returns what it got
]

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"

# CI has no network: the inventories are local files (see _intersphinx/build_inventories.py).
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", "_intersphinx/python.inv"),
    "torch": ("https://docs.pytorch.org/docs/stable", "_intersphinx/torch.inv"),
    "torchvision": ("https://docs.pytorch.org/vision/stable", "_intersphinx/torchvision.inv"),
    "numpy": ("https://numpy.org/doc/stable", "_intersphinx/numpy.inv"),
    "pillow": ("https://pillow.readthedocs.io/en/stable", "_intersphinx/pillow.inv"),
}

myst_heading_anchors = 2
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"dml_bias {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# Methods that are machinery rather than API: nn.Module's repr hook, torchvision v2's per-sample hooks (called by
# the transform itself). They stay out of the API pages even where a page lists members wholesale.
_HIDDEN_MEMBERS = {"extra_repr", "make_params", "transform", "training", "dump_patches", "call_super_init"}


def _skip_member(app, what, name, obj, skip, options):  # Sphinx's autodoc-skip-member event
    if name in _HIDDEN_MEMBERS and what == "class":
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_member)
