"""What keeps a long run going without a person: the --save lock, the restart ledger,
the hang monitor, the exit codes."""
