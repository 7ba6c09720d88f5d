"""Reading and writing model weights in other tools' formats (one module per format)."""
