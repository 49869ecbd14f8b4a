"""The methods: one family per module (rules, checks, chain blocks, wrappers)."""
