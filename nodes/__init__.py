"""ComfyUI glue for the ClassDiffusion trainer (imports ComfyUI; the trainer never does)."""
