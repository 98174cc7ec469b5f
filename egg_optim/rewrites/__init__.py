"""Reversible in-place layer rewrites driven by roles: output cloning and weight-gradient skipping."""
