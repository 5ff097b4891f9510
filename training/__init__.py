"""Training: datasets, production-condition augmentation, model, trainer, evaluation report."""
