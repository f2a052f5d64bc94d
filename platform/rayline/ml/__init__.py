"""Machine learning on Rayline: features, training, evaluation and the model registry."""
