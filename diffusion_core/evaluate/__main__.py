"""``python -m diffusion_core.evaluate``."""
from .cli import main

main()
