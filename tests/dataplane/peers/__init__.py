"""Real servers the proxy tests talk to (nginx, and h11/h2 servers we script), plus config builders."""
