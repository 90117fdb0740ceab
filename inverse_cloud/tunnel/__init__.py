"""The SSH link to the relay (reverse forwards), channel I/O, and the relay-side files."""
