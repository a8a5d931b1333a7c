"""The federation: agents and their blocks, and one round of the FedAvg variant (local round, server step, evaluation)."""
