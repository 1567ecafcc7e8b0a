"""``python -m cli``: the ``patchlife`` command without the installed script (how tests and tools spawn it)."""

from .main import main

raise SystemExit(main())
