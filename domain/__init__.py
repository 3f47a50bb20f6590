"""What the API process and the training process share: the job spec, dataset parsing and validation, the error
codes (without HTTP statuses), the job states, and the messages on the pipe between a worker and its training
process. Pure Python (stdlib + pydantic): it imports nothing else of ftjobs."""
