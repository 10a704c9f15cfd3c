# Sphinx configuration of the course site (docs/site/build_site.py assembles the source tree and runs sphinx-build).
# Offline by construction: no CDN anywhere. MathJax comes from the site's own _static/mathjax (build_site.py copies it),
# and the theme's fonts and icons are inside its wheel.
project = "minilcm"
author = "the minilcm course"
copyright = "2026, the minilcm course (MIT)"
html_title = "minilcm: from DDPM to latent consistency models"

extensions = ["myst_nb", "sphinx_design"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the committed outputs, as executed; the site never runs a notebook
nb_output_stderr = "show"
nb_code_prompt_show = "Show the solution"  # only solution cells are collapsed (build_site.py tags them)
nb_code_prompt_hide = "Hide the solution"
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]
exclude_patterns = ["_build", "student/*.ipynb", "**.ipynb_checkpoints"]

mathjax_path = "mathjax/tex-chtml.js"  # relative to _static: served from the site
html_static_path = ["_static"]
html_css_files = ["minilcm.css"]
html_theme = "sphinx_book_theme"
html_theme_options = {
    "use_download_button": True,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "launch_buttons": {},
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_context = {"default_mode": "auto"}  # left empty, the theme logs a console error on a first visit
html_show_sourcelink = False
html_last_updated_fmt = None
