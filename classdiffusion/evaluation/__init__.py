"""Measuring what personalization costs: semantic drift of the token (ClassDiffusion §3.2),
overfitting (Infusion's Latent Fisher divergence and Wasserstein metric) and the field's image
metrics (CLIP-T, CLIP-I, DINO-I) on the DreamBooth prompts. Never imports ComfyUI."""
