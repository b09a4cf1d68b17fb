"""language_server."""
