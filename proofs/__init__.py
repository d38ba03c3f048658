"""Symbolic checks of the algebra behind the MAC preconditioner."""
