"""The data plane's runtime config: an immutable model compiled once per discovery update."""
