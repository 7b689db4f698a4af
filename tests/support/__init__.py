"""Helpers shared by the tests (test modules import these, never each other): small random models
of each family, the naive O(L^2) references from the papers' equations, and a tensor-size probe."""
