"""Workload identity: SPIFFE IDs, the CA (embedded and as a service), the
certificate manager and the TLS contexts of the mTLS tunnel. See docs/identity.md."""
