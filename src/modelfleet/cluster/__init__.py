"""How modelfleet reaches a Ray cluster: an existing one, or a local instance it starts."""

from modelfleet.cluster.connect import connect

__all__ = ["connect"]
