"""The kopf operator: thin handlers over plain functions (peer health, node peers, federation)."""
