"""Registry, recipe language, block_pattern grammar, cache protocol, positions."""
