"""A2A protocol core, sans-I/O: card rewriting, request classification, stream relaying, error bodies."""
