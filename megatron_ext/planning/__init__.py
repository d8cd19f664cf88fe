"""What a run will be before it runs: its flags, the resolved run, the checks before the
start, the --dry-run plan."""
