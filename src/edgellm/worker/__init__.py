"""Worker runtime: joining the federation, backends, KV events."""
