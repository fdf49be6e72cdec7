"""blockctl: modular customization of diffusion models with BlockLoRA."""

__version__ = "0.1.0"
