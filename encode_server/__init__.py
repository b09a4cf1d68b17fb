"""encode_server."""
