"""The exit codes of every harness command (the command line prints them in its help)."""

EXIT_OK = 0
EXIT_FAILED = 1  # train: training failed; verify-resume: the runs differ
EXIT_CONFIG = 2
EXIT_CHECKPOINT = 3
EXIT_SAVE_FAILED = 4  # train: a checkpoint could not be written (disk full, quota, read-only, permission)
EXIT_PREEMPTED = 75  # saved a checkpoint on SIGTERM/SIGUSR1 (or the launcher's death): requeue to resume
EXIT_INTERRUPTED = 130  # Ctrl-C: saved a checkpoint (or, at a second Ctrl-C, aborted); 128 + SIGINT
