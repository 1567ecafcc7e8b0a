"""The ``patchlife`` command: one thin adapter per subcommand (``main.py``), options torch-free (``options.py``)."""
