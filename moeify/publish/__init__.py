"""Publishing a finished folder: `hub` uploads it, `card` writes the model card it carries."""
