"""The training components, one per file; each keeps the contract in training/contract.py."""
