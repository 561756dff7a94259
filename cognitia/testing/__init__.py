"""Test helpers that ship with cognitia: the backend conformance kit.

Any backend, yours included, can be checked against the protocol's rules::

    import pytest
    from cognitia.testing import conformance_rules

    @pytest.mark.anyio
    @pytest.mark.parametrize("rule", conformance_rules(), ids=str)
    async def test_my_backend(rule):
        await rule.check(lambda: MyBackend(...))

The factory must return a backend over *empty* storage the first time it is called in a
test, and a new backend object over the *same* storage on later calls (so persistence
across objects can be checked). Rules for optional capabilities run only when the backend
declares them in its ``capabilities`` attribute.
"""

from ._conformance import ConformanceRule, conformance_rules

__all__ = ["ConformanceRule", "conformance_rules"]
