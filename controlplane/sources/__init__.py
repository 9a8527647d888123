"""Config sources: where Kubernetes-shaped objects come from (a folder today, a cluster later)."""

from controlplane.sources.folder import FolderSource, FolderState

__all__ = ["FolderSource", "FolderState"]
