"""Rollouts: one operator-signed deployment document assigned to a target set step by step,
each step behind a health gate, with a failure budget and automatic rollback.

``spec`` parses what an operator asks for, ``machine`` is the sans-IO state machine (events
and the time in, actions out), ``driver`` runs it in the controller against the store.
"""
