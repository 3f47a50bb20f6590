"""Webhooks: a tenant's jobs' state changes and checkpoints POSTed to its URL, signed as Standard Webhooks says.

The database is the outbox (repository.py): a delivery row is inserted in the transaction that adds the event
it reports, so no committed event goes unreported and none is reported that did not commit. The workers send
them (delivery.py), each in a thread of its own beside the reconciler.
"""
