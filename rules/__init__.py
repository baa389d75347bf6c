"""Rule templates and composites, as data (ONNX text functions and TOML tables)."""
