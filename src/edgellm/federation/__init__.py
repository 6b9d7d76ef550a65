"""The federation of clusters: join tokens, membership, credentials, and mirroring of peers.

No cluster is special: each member holds a `FederationMember` and a scoped credential for every
other member, and each operator mirrors its own peers into all of them. docs/federation.md
describes the protocol.
"""
