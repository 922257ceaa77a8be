"""Training of the fusion networks on the aanlib train split."""
