"""What the planner learns from finished jobs: their measured peaks (repository.py), the correction a plan gets
and the accuracy report (service.py). The arithmetic is planner/calibration.py's."""
