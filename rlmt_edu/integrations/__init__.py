"""Bridges from the library to engines that train real models at scale (``rlmt_edu.integrations.trl``).

Each bridge sits behind its own extra (``pip install -e ".[trl]"``) and is imported on its own: importing
``rlmt_edu`` never imports an engine.
"""
