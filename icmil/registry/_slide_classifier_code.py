"""MLflow "models from code" entry point of the slide classifier.

MLflow copies this file into the model and runs it on load, so the logged model contains no pickle: the
weights are safetensors files read by :class:`icmil.registry.slide_classifier.SlideClassifier`.
"""

import mlflow

from icmil.registry.slide_classifier import SlideClassifier

mlflow.models.set_model(SlideClassifier())
