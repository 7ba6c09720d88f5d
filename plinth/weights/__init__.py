"""Model weights in and out: one module per format (GGUF, Hugging Face safetensors folders, plinth's own),
and `load.py`, which recognises a path's format and builds the model."""
