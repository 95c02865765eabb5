"""Model building: Hugging Face image-text-to-text families through the Auto classes, and the tiny
LLaVA built from config. Depends only on `core`."""
