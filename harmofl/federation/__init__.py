"""The orchestrator in small parts; ``docs/architecture.md`` maps them."""
