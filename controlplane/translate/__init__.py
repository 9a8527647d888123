"""The pure Gateway API translator shared by the folder and Kubernetes sources."""

from controlplane.translate.routes import INVALID_BACKEND_KEY
from controlplane.translate.translator import CONTROLLER_NAME, ObjectStatus, TranslationResult, translate

__all__ = ["CONTROLLER_NAME", "INVALID_BACKEND_KEY", "ObjectStatus", "TranslationResult", "translate"]
