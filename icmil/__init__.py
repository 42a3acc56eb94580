"""ICMIL: Iteratively Coupled Multiple Instance Learning for whole-slide images, on Kubeflow + MLflow."""

__version__ = "0.1.0"
