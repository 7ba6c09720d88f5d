"""Adapting a pretrained model: LoRA/QLoRA, fine-tuning recipes, classification heads, chat SFT, prompting."""
