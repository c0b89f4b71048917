"""diffusion_core: DDPM, classifier-free guidance and MCL experts on MNIST behind one denoiser interface."""

__version__ = "0.1.0"
