"""What the bench tests share."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def parsed(add_arguments: Callable[[argparse.ArgumentParser], None], **kw: object) -> argparse.Namespace:
    """A command's defaults (its ``add_arguments`` on an empty command line), with ``kw`` set over them."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns
