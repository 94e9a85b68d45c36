"""The concept file: what a run writes and everything that reads it back.

``file`` holds the :class:`Concept` and how it is saved, ``reading`` how it is read back and
checked, ``storage`` the atomic writes every file of the pack goes through; ``meta`` its settings and provenance;
``interop`` the official and Custom Diffusion layouts; ``apply`` puts a concept on a diffusers
pipeline and ``generate`` samples with it. Imported by the training run, the CLI, the evaluation
and the nodes; it imports the model parts and the methods (for their tensors), never the run.
"""

from .file import FORMAT, FORMAT_VERSION, Concept, compress_concept, embedding_tensors, save_embeddings, weights_family
from .reading import checkpoint_table, load_concept, read_metadata
from .storage import (STALE_TEMP_SECONDS, atomic_save_file, atomic_write, check_regular_file, remove_stale_temporaries,
                      run_files)

__all__ = ["FORMAT", "FORMAT_VERSION", "STALE_TEMP_SECONDS", "Concept", "atomic_save_file", "atomic_write",
           "check_regular_file", "checkpoint_table", "compress_concept", "embedding_tensors", "load_concept",
           "read_metadata", "remove_stale_temporaries", "run_files", "save_embeddings", "weights_family"]
