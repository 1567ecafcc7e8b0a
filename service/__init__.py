"""patchlife HTTP service."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a tree that is not installed)."""
    try:
        return version("patchlife")
    except PackageNotFoundError:
        return "0+unknown"
