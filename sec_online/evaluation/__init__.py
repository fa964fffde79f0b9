"""Offline evaluation of recommendation policies in a user simulator fitted to the log.

- ``dataset``: the log as videos, requests, impressions and user-days, split by day.
- ``simulator``: response, leave and return models of users, fitted on train days.
- ``env``: batched rollouts of a policy in the simulator, with retention metrics.
- ``metrics``: ROC AUC, total variation distance and nuclear norm.
"""
