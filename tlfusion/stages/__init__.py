"""The pipeline's stages, one file per stage, and their registry (`stages.registry`)."""
