"""EdgeLLM: decentralised LLM inference over a federation of Kubernetes clusters."""
