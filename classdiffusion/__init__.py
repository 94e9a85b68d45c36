"""ClassDiffusion: Custom Diffusion K/V personalization plus the semantic preservation loss,
for Stable Diffusion 1.5. Host-agnostic; never imports ComfyUI."""

__version__ = "0.1.0"
