"""Fusion networks (MRDFN, LYWNet, DM-FNet) and their weight loading."""
