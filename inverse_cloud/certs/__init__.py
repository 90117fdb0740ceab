"""Certificates: the on-disk store and hot swap, renewal policy (pure), ACME, CAA, the manager."""
