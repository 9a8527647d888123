"""Gateway API HTTPRoute matching and filters, compiled at config time and read per request."""
