"""Verification checks, one module per kind; importing a module registers its checks."""
