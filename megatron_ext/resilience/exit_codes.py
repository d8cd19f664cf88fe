"""The exit codes of ``pretrain_gpas.py``, named once: the CLI exits with them, the restart
ledger refuses restarts by them, the SLURM script does not requeue them, and the tests expect
them. Torch-free.

A restart changes none of the deliberate stops: the same flags, data and checkpoints would
stop the same way again."""

OK = 0
FAILED = 1  # anything unforeseen (a crash, a killed rank): a restart may help
BAD_INPUT = 2  # flags, data, or a --save directory another run holds
STOPPED = 3  # a checkpoint problem or too many non-finite steps; the last good state is saved
NO_PROGRESS = 4  # a restart refused: the last restarts all resumed from the same checkpoint

DELIBERATE = (BAD_INPUT, STOPPED, NO_PROGRESS)  # what a restart does not change
