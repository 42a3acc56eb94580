"""The import path of the slide classifier in models registered before ``icmil.registry`` existed.

A model's ``_slide_classifier_code.py`` is stored with the model and run by ``mlflow models serve`` /
``mlflow.pyfunc.load_model``; in models registered earlier it imports
``icmil.tracking.slide_classifier.SlideClassifier``, so this module keeps those models loading. New code:
:mod:`icmil.registry.slide_classifier`.
"""

from icmil.registry.slide_classifier import SlideClassifier

__all__ = ["SlideClassifier"]
