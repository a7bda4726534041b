"""The shared measurement harness of the KV-cache lessons (one module per concern)."""
