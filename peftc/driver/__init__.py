"""The compile driver: ``pipeline.py`` runs load → trace → adapt → optimize → lower → verify → commit.

* ``build.py``: the stages every mode shares (read adapters, load and trace the model, parse the
  adapters against it, insert their sites) and their timing;
* ``modes.py``: the build modes (merged, unmerged; swappable in ``peftc/swap/mode.py``): each owns its
  pass list, its lowering extras, its verification and its manifest fields;
* ``manifest.py``: the manifest of a compile; ``sources.py``: the model and adapters a manifest names,
  loaded again and checked (``peftc verify``, ``peftc add-adapter``).

This package's namespace is empty on purpose: import the module you need.
"""
