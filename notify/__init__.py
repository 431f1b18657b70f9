"""The notify edge: emails and webhooks from the core's outbox, over URFA only (see notify/process.py)."""
