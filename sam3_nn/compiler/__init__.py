"""Build a library: target presets (data), one ordered pass pipeline per target, export."""
