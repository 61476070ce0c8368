"""launcher: one YAML config takes a PyTorch training job from a laptop to a Slurm cluster."""

__version__ = "0.1.0"
