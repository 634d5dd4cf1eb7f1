"""registry.server: the OpenAI-compatible multi-tenant server of issue 12 (`surgery serve`).
`registry.server.tenancy` holds its web-free policy: API keys, namespaces, limits, request bodies."""
