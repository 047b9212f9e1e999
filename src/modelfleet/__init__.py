"""modelfleet: Ray Train + DeepSpeed training and Ray Serve serving on one Ray cluster."""

__version__ = "0.1.0"
