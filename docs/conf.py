"""Sphinx configuration of the amp_optax documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

or ``make -C docs html``. Nothing here needs the network: no intersphinx, the example notebook
is stored executed (``docs/notebooks/``, checked against ``examples/notebooks/`` by
``tests/test_docs.py``), and the benchmark tables are generated from
``benchmarks/results/*.json`` by ``_ext/amp_docs.py``.
"""

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
sys.path.insert(0, REPO)  # autodoc documents this checkout, installed or not.
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import amp_optax  # noqa: E402

project = "amp_optax"
author = "the amp_optax authors"
copyright = "2026, the amp_optax authors"  # noqa: A001
release = amp_optax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 bundled: the maths renders offline too.
    "sphinx.ext.viewcode",
    "myst_nb",
    "sphinx_copybutton",
    "sphinx_design",
    "amp_docs",
]

exclude_patterns = ["_build", "generated/*.md", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# Markdown (MyST) and notebooks (myst-nb).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # stored executed: executing it costs ~80 s on 2 CPU cores.
nb_merge_streams = True

# API reference: one page per public name, from the Google-style docstrings.
autosummary_generate = True
autosummary_imported_members = False
# The docstrings say the types in words; the annotations' aliases (ScalarOrSchedule, ...)
# expand into unions of a dozen array types, which help nobody.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not as duplicates of the members.
napoleon_use_rtype = False
napoleon_attr_annotations = False  # "jax.jaxlib._jax.Array" after each field helps nobody.
add_module_names = False

# Copy buttons skip prompts and output lines.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = False

html_theme = "sphinx_book_theme"
html_title = f"amp_optax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
    "navbar_persistent": [],  # one search field (the sidebar's), not a second one in a header.
}
html_last_updated_fmt = None
