"""The optional L7 proxy. Not built yet."""
