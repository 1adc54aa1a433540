"""Training: the recipe (setup -> fit -> select), its loop and what only training needs (LoRA wrapping, full
fine-tuning, checkpoints, weight averaging, the teacher, losses, the slot objective). Inference never imports
this package (tests/test_structure.py)."""
