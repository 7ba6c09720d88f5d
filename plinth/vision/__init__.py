"""Images in: decoding, resizing and image datasets, ViT patches, MAE, image+text and diffusion."""
