"""Shared pytest wiring: each fixture family lives in its own module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.model",
    "tests.fixtures.labelstudio",
]
