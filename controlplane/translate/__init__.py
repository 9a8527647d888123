"""The pure Gateway API translator shared by the folder and Kubernetes sources."""

from controlplane.translate.translator import CONTROLLER_NAME, ObjectStatus, TranslationResult, translate

__all__ = ["CONTROLLER_NAME", "ObjectStatus", "TranslationResult", "translate"]
