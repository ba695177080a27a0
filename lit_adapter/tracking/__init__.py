"""What a run reports: experiment loggers, the run record, results and a quiet console."""
