"""Placement as a pipeline of small plugins: filters narrow the peers, weighted scorers rank
them, a picker chooses (as the Kubernetes scheduler framework and llm-d's endpoint picker do).
One implementation serves the operator and the router. Imports only `edgellm.api`.
"""

from edgellm.scheduling.framework import (
    PLUGIN_BUCKETS,
    Candidate,
    Decision,
    Filter,
    MemoryShortfall,
    Picker,
    Profile,
    Scorer,
    Unschedulable,
    WeightedScorer,
    schedule,
)
from edgellm.scheduling.plugins import (
    ProfileConfig,
    configured_profile,
    default_profile,
    registry,
)

__all__ = [
    "PLUGIN_BUCKETS",
    "Candidate",
    "Decision",
    "Filter",
    "MemoryShortfall",
    "Picker",
    "Profile",
    "ProfileConfig",
    "Scorer",
    "Unschedulable",
    "WeightedScorer",
    "configured_profile",
    "default_profile",
    "registry",
    "schedule",
]
