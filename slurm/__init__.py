"""Dispatch of every project step as a submitit job: locally by default, on SLURM when
configured."""
