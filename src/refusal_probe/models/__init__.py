"""Where weights come from (hub id, local dir, GGUF, embedded default) and how checkpoint trees are read."""
