"""EdgeLLM's OpenAI-compatible router: requests in, the federation's workers chosen by the
shared scheduling plugins (KV-cache overlap from the workers' KV events first), answers out.
Run by `edgellm router` (and `images/router`); never imports the operator.
"""
