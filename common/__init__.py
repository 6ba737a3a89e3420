"""What every part of the project runs on, below the method: errors, config checks, command lines,
atomic files,
run dirs, metrics records, schedules, seeds, processes and CPU numerics. It imports no other project
package."""

__version__ = "0.1.0"
