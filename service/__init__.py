"""patchlife HTTP service."""
