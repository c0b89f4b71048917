"""The Gradio app, one module per concern; ``app.py`` only composes them.

Each tab module holds its tab's logic (plain Python over numpy, PIL and matplotlib, unit-tested
without a browser) and a ``build`` that lays out its components and wires its events. The logic
renders what the library yields: the pipeline draws every noise and runs every sampler, the UI
never does. Import a name from the module that defines it:

* ``common``: the app's limits and labels, checkpoints on disk (``ModelInfo``,
  ``available_models``), menus, which controls apply, and validation (``parse_settings`` turns raw
  control or API values into ``pipeline.Settings`` or raises ``ValueError`` with a message a
  person can act on);
* ``glue``: Gradio glue: ``user_errors`` (bad input becomes a message), ``carry_forward`` and
  ``streamed`` (every streamed chunk repeats the outputs set so far), ``final_image``;
* ``files``: ``OutputFiles`` (the files handed to the browser) and ``png_files``;
* ``render``: upscaling, grids, frames, strips, the filmstrip, the GIF and the MCL chart;
* ``share``: Generate's share links; ``links``: a share link of any tab -> its tab and settings;
* ``controls``: the controls on the left, shared by every tab (``Shared``);
* ``generate_tab``, ``compare_tab``, ``explore_tab`` (with ``cold_panel``), ``models_tab``: the tabs;
* ``api``: the named endpoints; ``page``: the page's text, style, and what a share link opens on load.
"""
